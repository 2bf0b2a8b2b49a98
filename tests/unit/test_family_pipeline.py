"""The in-process pipeline for the image-conditioned Wan2.2 kinds against diffusers: I2V-A14B and TI2V-5B with an
image against `WanImageToVideoPipeline`, TI2V-5B without one against `WanPipeline` (expand_timesteps), on the torch
engines. Tolerance: `checks.assert_frames_close` (2 uint8 levels at most, 0.5 on average), fp32 on the CPU. The ONNX
Runtime engine (the exported graphs, VAE encoder included) is checked the same way through the real server
(tests/server/test_family_parity.py).

The checkpoints are tiny random-weight ones whose sizes differ from the tiny-i2v / tiny-ti2v defaults
(conftest OTHER_I2V, OTHER_TI2V). Both sides see the same pixels: the test resizes the PIL image to the request's
size (Lanczos) and gives diffusers that image, and the pipeline its uint8 array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checks import assert_frames_close, reference_frames, reference_i2v_frames
from factories import load_deployment, validated_request
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.pipeline import LocalPipeline

# I2V: 32x48 pixels (multiples of 16), 9 frames, 6 steps crossing the expert boundary (0.9 at flow shift 5).
I2V_CALL = dict(
    prompt="a fox runs",
    negative_prompt="dark",
    height=32,
    width=48,
    num_frames=9,
    num_inference_steps=6,
    guidance_scale=3.5,
    guidance_scale_2=2.0,
    seed=5,
)
# TI2V: multiples of 32 pixels (16x VAE x patch 2), one transformer.
TI2V_CALL = dict(
    prompt="a bird flies",
    negative_prompt="blurry",
    height=64,
    width=96,
    num_frames=9,
    num_inference_steps=5,
    guidance_scale=5.0,
    seed=7,
)


def condition_image(height: int, width: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A random RGB picture of another size, resized to the request's as the serving side resizes it (Lanczos
    stretch): the PIL image diffusers gets and the uint8 [height, width, 3] array the pipeline gets."""
    rng = np.random.default_rng(seed)
    source = Image.fromarray(rng.integers(0, 256, size=(height + 7, width - 5, 3), dtype=np.uint8))
    resized = source.resize((width, height), Image.LANCZOS)
    return resized, np.asarray(resized, dtype=np.uint8).copy()


def _pipeline(checkpoint: Path, deployment_name: str, artifacts: Path) -> tuple[Checkpoint, object, LocalPipeline]:
    deployment = load_deployment(deployment_name)
    ckpt = Checkpoint.open(checkpoint)
    return ckpt, deployment, LocalPipeline.load(ckpt, deployment, artifacts=artifacts)


def _request(ckpt, deployment, call):
    values = {k: v for k, v in call.items() if k != "guidance_scale_2"}
    values["guidance_scale_2"] = call.get("guidance_scale_2", call["guidance_scale"])
    return validated_request(
        deployment, spatial_multiple=ckpt.spatial_multiple, temporal_stride=ckpt.vae_scale_factor_temporal, **values
    )


@pytest.fixture(scope="module")
def i2v_torch(i2v_checkpoint):
    return _pipeline(i2v_checkpoint, "cpu_torch", Path("/nonexistent"))


@pytest.fixture(scope="module")
def ti2v_torch(ti2v_checkpoint):
    return _pipeline(ti2v_checkpoint, "cpu_torch", Path("/nonexistent"))


def test_kinds_are_read_from_the_checkpoints(i2v_checkpoint, ti2v_checkpoint):
    i2v, ti2v = Checkpoint.open(i2v_checkpoint), Checkpoint.open(ti2v_checkpoint)
    assert (i2v.image_input, i2v.latent_channels, i2v.spatial_multiple, i2v.boundary_ratio) == ("required", 12, 16, 0.9)
    assert int(i2v.config("transformer")["in_channels"]) == 12 + 4 + 12
    assert (ti2v.image_input, ti2v.latent_channels, ti2v.spatial_multiple) == ("optional", 24, 32)
    assert ti2v.expand_timesteps and not ti2v.has_expert("transformer_2") and ti2v.boundary_ratio is None


def test_i2v_matches_wan_image_to_video_pipeline_torch(i2v_torch, i2v_checkpoint):
    ckpt, deployment, pipe = i2v_torch
    image, pixels = condition_image(I2V_CALL["height"], I2V_CALL["width"])
    frames = pipe.generate(_request(ckpt, deployment, I2V_CALL), condition_image=pixels)
    assert_frames_close(frames, reference_i2v_frames(i2v_checkpoint, image, **dict(I2V_CALL)))


def test_ti2v_with_image_matches_wan_image_to_video_pipeline_torch(ti2v_torch, ti2v_checkpoint):
    ckpt, deployment, pipe = ti2v_torch
    image, pixels = condition_image(TI2V_CALL["height"], TI2V_CALL["width"], seed=1)
    frames = pipe.generate(_request(ckpt, deployment, TI2V_CALL), condition_image=pixels)
    # The first frame is the condition image, through the VAE and back.
    assert_frames_close(frames, reference_i2v_frames(ti2v_checkpoint, image, **dict(TI2V_CALL)))


def test_ti2v_without_image_matches_wan_pipeline_torch(ti2v_torch, ti2v_checkpoint):
    ckpt, deployment, pipe = ti2v_torch
    frames = pipe.generate(_request(ckpt, deployment, TI2V_CALL))
    assert_frames_close(frames, reference_frames(ti2v_checkpoint, **dict(TI2V_CALL)))


def test_image_rules_follow_the_checkpoint(i2v_torch):
    ckpt, deployment, pipe = i2v_torch
    with pytest.raises(ValueError, match="needs a condition image"):
        pipe.generate(_request(ckpt, deployment, I2V_CALL))
    wrong = np.zeros((I2V_CALL["height"], I2V_CALL["width"] + 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not match"):
        pipe.generate(_request(ckpt, deployment, I2V_CALL), condition_image=wrong)


def test_ti2v_requests_with_and_without_image_batch_together(ti2v_torch):
    """One expert forward for both requests (each row with its own per-frame timesteps) gives each request's
    latents as when it runs alone."""
    from wan_triton.model.denoise import BatchItem
    from wan_triton.pipeline import encode_prompts, prompts_for

    ckpt, deployment, pipe = ti2v_torch
    request = _request(ckpt, deployment, {**TI2V_CALL, "num_inference_steps": 3})
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts_for(request))
    _, pixels = condition_image(request.height, request.width, seed=2)
    items = [BatchItem(request, embeds, condition_image=pixels), BatchItem(request, embeds)]
    calls = []
    engine = pipe.denoiser.experts["transformer"]
    original = engine.run
    engine.run = lambda inputs: calls.append(inputs["timestep"].clone()) or original(inputs)
    try:
        together = pipe.denoiser.run_batch(items)
        alone = [pipe.denoiser.run_batch([item])[0] for item in items]
    finally:
        del engine.run
    # The batched forwards: 4 rows (2 requests x cond/uncond), one timestep per latent frame, 0 only on the image's
    # first frame.
    assert calls[0].shape == (4, 3) and (calls[0][:2, 0] == 0).all() and (calls[0][2:, 0] > 0).all()
    for got, ref in zip(together, alone, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # With the image the first latent frame is the encoded image itself; without, it is denoised like the rest.
    assert not torch.equal(together[0][:, :, 0], together[1][:, :, 0])
