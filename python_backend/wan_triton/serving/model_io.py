"""Every Triton model's inputs and outputs, and how the `wan_t2v` ensemble wires them, in one table.

The renderer writes the I/O sections of every `config.pbtxt` and the ensemble's steps from here, and the model
classes read their tensors by these names, so a name exists in exactly one place. Ensemble inputs and outputs are
lower snake case (`prompt`, `video`); intermediate ensemble tensors are `_`-prefixed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from wan_triton.model.checkpoint import MAX_SEQUENCE_LENGTH


@dataclass(frozen=True)
class IO:
    name: str
    triton_dtype: str  # config.pbtxt data_type
    dims: tuple[int, ...]  # -1 for a variable dim
    optional: bool = False
    doc: str = ""


# The request contract. Everything but `prompt` is optional; defaults come from the deployment config.
REQUEST_INPUTS: tuple[IO, ...] = (
    # Declared optional although it is required: a Triton ensemble left without a required input fails with an
    # opaque "deadlock" error, while preprocess answers INVALID_ARG "prompt: is required".
    IO("prompt", "TYPE_STRING", (1,), optional=True, doc="UTF-8 text; required"),
    IO("negative_prompt", "TYPE_STRING", (1,), optional=True, doc="UTF-8 text; used when guidance_scale > 1"),
    IO("height", "TYPE_INT64", (1,), optional=True, doc="pixels, multiple of 16"),
    IO("width", "TYPE_INT64", (1,), optional=True, doc="pixels, multiple of 16"),
    IO("num_frames", "TYPE_INT64", (1,), optional=True, doc="4k+1"),
    IO("num_inference_steps", "TYPE_INT64", (1,), optional=True),
    IO("seed", "TYPE_INT64", (1,), optional=True, doc="initial noise from torch.Generator('cpu').manual_seed(seed)"),
    IO("guidance_scale", "TYPE_FP32", (1,), optional=True, doc="high-noise expert"),
    IO("guidance_scale_2", "TYPE_FP32", (1,), optional=True, doc="low-noise expert"),
    IO("fps", "TYPE_INT64", (1,), optional=True, doc="frames per second of the MP4"),
    IO("timeout_s", "TYPE_FP32", (1,), optional=True, doc="deadline in seconds from arrival; stops the denoising loop"),
    # Declared by every kind, so one client and one contract serve them all; preprocess refuses it where the
    # checkpoint takes none and requires it where the checkpoint needs one (`Checkpoint.image_input`).
    IO("image", "TYPE_STRING", (1,), optional=True, doc="PNG, JPEG or WebP file bytes (image-to-video)"),
)
RESPONSE_OUTPUTS: tuple[IO, ...] = (
    IO("video", "TYPE_STRING", (1,), doc="H.264 MP4 file"),
    IO("frames", "TYPE_UINT8", (-1, -1, -1, 3), doc="[num_frames, height, width, 3] RGB"),
    IO("used_seed", "TYPE_INT64", (1,), doc="the seed used (drawn at random when the request gave none)"),
)

# Intermediate tensors, named as the producing model's output.
# The tensors into the scheduler carry a leading dim of 1: the scheduler batches requests (Triton's dynamic
# batcher, `max_batch_size` > 0), so its config declares them without that dim and Triton reads it as the batch.
REQUEST_JSON = IO("request", "TYPE_STRING", (1, 1), doc="the validated request with defaults filled, JSON")
INPUT_IDS = IO("input_ids", "TYPE_INT64", (-1, MAX_SEQUENCE_LENGTH))
ATTENTION_MASK = IO("attention_mask", "TYPE_INT64", (-1, MAX_SEQUENCE_LENGTH))
PROMPT_EMBEDS = IO(
    "prompt_embeds", "TYPE_FP32", (1, -1, MAX_SEQUENCE_LENGTH, -1), doc="[1, prompt[, negative prompt], ...]"
)
LATENTS = IO("latents", "TYPE_FP32", (1, -1, -1, -1, -1))
# The request's image decoded and resized to the video's size; [1, 0, 0, 3] when the request has none. The image's
# file bytes stop at preprocess.
CONDITION_IMAGE = IO("condition_image", "TYPE_UINT8", (1, -1, -1, 3), doc="[1, height, width, 3] RGB")
VIDEO, FRAMES, USED_SEED = RESPONSE_OUTPUTS
DECODED_FRAMES = IO("decoded_frames", "TYPE_UINT8", (-1, -1, -1, 3), doc="[num_frames, height, width, 3] RGB")

# Scheduler inputs only the stream model gives (the ensemble leaves them out): `job_token` names the request's files
# on the `stopping.JobBoard` (cancel flag in, progress and previews out); with `preview_every` k > 0 the scheduler
# leaves the clean-latent estimate of the first latent frame there every k steps. Batched: [1, 1] per request.
JOB_TOKEN = IO("job_token", "TYPE_STRING", (1, 1), optional=True, doc="32 hex digits")
PREVIEW_EVERY = IO("preview_every", "TYPE_INT64", (1, 1), optional=True, doc="0: no previews; k: every k steps")

# The streaming endpoint `<model_name>_stream` (decoupled): the request contract plus `preview`; progress responses
# carry `stage`, `step`, `num_steps`, `elapsed_s` (and `preview_frame` when due); the final one adds the
# RESPONSE_OUTPUTS.
PREVIEW = IO("preview", "TYPE_INT64", (1,), optional=True, doc="0: no previews (default); k: a preview every k steps")
STAGE = IO("stage", "TYPE_STRING", (1,), doc="text_encode, denoise, vae_decode, postprocess or done")
STEP = IO("step", "TYPE_INT64", (1,), doc="denoising steps done")
NUM_STEPS = IO("num_steps", "TYPE_INT64", (1,), doc="denoising steps in all")
ELAPSED_S = IO("elapsed_s", "TYPE_FP32", (1,), doc="seconds since the stream model received the request")
PREVIEW_FRAME = IO("preview_frame", "TYPE_UINT8", (-1, -1, 3), doc="[height, width, 3] RGB, first frame, small")
PROGRESS_OUTPUTS: tuple[IO, ...] = (STAGE, STEP, NUM_STEPS, ELAPSED_S, PREVIEW_FRAME)


@dataclass(frozen=True)
class ModelIO:
    role: str  # suffix of the Triton model name: <deployment model_name>_<role>
    inputs: tuple[IO, ...]
    outputs: tuple[IO, ...]
    # Served with max_batch_size > 0: every tensor's leading dim (1 per request) is Triton's batch dim.
    batched: bool = False
    # Inputs that are not wired in the ensemble (only the stream model gives them).
    extra_inputs: tuple[IO, ...] = ()


PREPROCESS = ModelIO(
    "preprocess", REQUEST_INPUTS, (REQUEST_JSON, INPUT_IDS, ATTENTION_MASK, USED_SEED, CONDITION_IMAGE)
)
TEXT_ENCODER = ModelIO("text_encoder", (INPUT_IDS, ATTENTION_MASK), (PROMPT_EMBEDS,))
SCHEDULER = ModelIO(
    "scheduler",
    (REQUEST_JSON, PROMPT_EMBEDS, CONDITION_IMAGE),
    (LATENTS,),
    batched=True,
    extra_inputs=(JOB_TOKEN, PREVIEW_EVERY),
)
# The MP4 the vae_decoder step encoded while decoding (deployment `video.encode_while_decoding`, for the fps it
# reads the request); empty where the deployment leaves the encode to postprocess, or the caller did not ask for it.
DECODED_VIDEO = IO("decoded_video", "TYPE_STRING", (1,), doc="H.264 MP4 file, or empty")
# The decoder turns pixels into uint8 frames where it decoded them (on the GPU when it runs there): a quarter of
# the bytes of float pixels. Where postprocess encodes the MP4, the frames cross to it and it re-emits them as the
# `frames` output, because an ensemble drops an output the client did not ask for, even when a later step reads it;
# so too the MP4. Where the vae_decoder step encodes it, the frames go from that step straight to the response
# (`ensemble_steps`), and postprocess, which no longer gets them (an optional input), hands on the MP4 alone.
VAE_DECODER = ModelIO("vae_decoder", (LATENTS, replace(REQUEST_JSON, optional=True)), (DECODED_FRAMES, DECODED_VIDEO))
POSTPROCESS = ModelIO(
    "postprocess", (REQUEST_JSON, replace(DECODED_FRAMES, optional=True), DECODED_VIDEO), (VIDEO, FRAMES)
)

STEPS: tuple[ModelIO, ...] = (PREPROCESS, TEXT_ENCODER, SCHEDULER, VAE_DECODER, POSTPROCESS)

# Beside the ensemble, not in it: Triton 2.51 refuses unary calls to an ensemble with a decoupled step, so the stream
# model is a decoupled BLS model calling the five steps itself, and `wan_t2v` stays a plain ensemble.
STREAM = ModelIO("stream", (*REQUEST_INPUTS, PREVIEW), (*RESPONSE_OUTPUTS, *PROGRESS_OUTPUTS))


def ensemble_tensor(producer: ModelIO, io: IO) -> str:
    """The ensemble's name for a step output: response outputs keep their names, the rest get a `_` prefix."""
    if io in RESPONSE_OUTPUTS:
        return io.name
    return f"_{io.name}"


def producers() -> dict[str, ModelIO]:
    """Which step produces each intermediate tensor (by IO name)."""
    table: dict[str, ModelIO] = {}
    for step in STEPS:
        for out in step.outputs:
            if out.name in table:
                raise ValueError(f"tensor {out.name!r} produced by both {table[out.name].role} and {step.role}")
            table[out.name] = step
    return table


def _io_block(kind: str, items: tuple[IO, ...], batched: bool = False) -> str:
    entries = []
    for io in items:
        dims = io.dims
        if batched:
            if dims[0] not in (1, -1) or len(dims) < 2:
                raise ValueError(f"{io.name}: a batched model's tensor needs a leading dim of 1, got {dims}")
            dims = dims[1:]
        fields = [f'name: "{io.name}"', f"data_type: {io.triton_dtype}", f"dims: [ {', '.join(map(str, dims))} ]"]
        if io.optional:
            fields.append("optional: true")
        entries.append("  {\n    " + "\n    ".join(fields) + "\n  }")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


def config_io(model: ModelIO) -> str:
    """The `input [...]` / `output [...]` section of a step's config.pbtxt."""
    inputs = model.inputs + model.extra_inputs
    return _io_block("input", inputs, model.batched) + "\n" + _io_block("output", model.outputs, model.batched)


def ensemble_io() -> str:
    return _io_block("input", REQUEST_INPUTS) + "\n" + _io_block("output", RESPONSE_OUTPUTS)


def ensemble_steps(model_name: str, frames_from_decoder: bool = False) -> str:
    """The `ensemble_scheduling { step [...] }` body wiring every step by tensor name.

    With `frames_from_decoder` (the vae_decoder step encodes the MP4: deployment `video.encode_while_decoding`), the
    response's `frames` are the vae_decoder step's output and do not pass through postprocess: at 720p x 81 frames
    that is 224 MB that postprocess would otherwise take in and copy out again on every request.
    """
    made_by = producers()
    steps = []
    for step in STEPS:
        lines = [f'    model_name: "{model_name}_{step.role}"', "    model_version: -1"]
        for io in step.inputs:
            if frames_from_decoder and step is POSTPROCESS and io.name == DECODED_FRAMES.name:
                continue
            source = io.name if step is PREPROCESS else ensemble_tensor(made_by[io.name], io)
            lines.append(f'    input_map {{ key: "{io.name}" value: "{source}" }}')
        for io in step.outputs:
            target = ensemble_tensor(step, io)
            if frames_from_decoder and step is POSTPROCESS and io is FRAMES:
                continue
            if frames_from_decoder and step is VAE_DECODER and io is DECODED_FRAMES:
                target = FRAMES.name
            lines.append(f'    output_map {{ key: "{io.name}" value: "{target}" }}')
        steps.append("  {\n" + "\n".join(lines) + "\n  }")
    return "step [\n" + ",\n".join(steps) + "\n]"
