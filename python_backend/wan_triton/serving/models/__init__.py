"""The Python-backend model classes of the `wan_t2v` ensemble and its stream model, one module per role, named as
the role; each model.py imports its class from its own role's module as TritonPythonModel.

preprocess -> text_encoder -> scheduler (the denoising loop, owning both experts in its own process) ->
vae_decoder -> postprocess; stream beside them. See `model_io` for the tensors between them.

Each step is its own process and imports only its own module, so nothing is imported here: the steps that run no
model (preprocess, postprocess, stream) never load torch, diffusers or an engine (tests/unit/test_light_steps.py).
"""
