"""Validate one generation request against the deployment's limits and fill its defaults.

Errors are `InvalidRequestError`, which names the field and what is allowed; the Triton glue turns them into
`INVALID_ARG` responses. Nothing here is an `assert`: requests are user input.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from wan_triton.config.deployment import Deployment

# diffusers' WanPipeline.do_classifier_free_guidance: guidance is on when guidance_scale > 1.
GUIDANCE_THRESHOLD = 1.0
MIN_GUIDANCE_SCALE = 0.0
MAX_SEED = 2**63 - 1
# What a checkpoint does with the `image` input: refuses it (text-to-video), needs it (image-to-video), or takes it
# when given (TI2V-5B: text-to-video without one).
ImageInput = Literal["none", "required", "optional"]


class InvalidRequestError(ValueError):
    """A request input is missing or outside what the deployment allows."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    height: int  # pixels
    width: int  # pixels
    num_frames: int
    num_inference_steps: int
    seed: int
    guidance_scale: float  # high-noise expert (`transformer`)
    guidance_scale_2: float  # low-noise expert (`transformer_2`)
    fps: int
    # The deadline: `timeout_s` from when preprocess validated the request (wall clock, shared by every model
    # process of the server). None: no deadline.
    timeout_s: float | None = None
    deadline_unix_s: float | None = None
    # The conditioning image's file bytes (image-to-video), as the client sent them; only the preprocessing process
    # holds them (`request_json` leaves them out: the steps after it get the decoded image as a tensor). `has_image`
    # says whether there is one, and travels with the rest.
    image: bytes | None = dataclasses.field(default=None, repr=False)  # megabytes: kept out of log lines
    has_image: bool = False

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > GUIDANCE_THRESHOLD


def request_json(request: GenerationRequest) -> bytes:
    """The request as the JSON the ensemble's steps pass on: everything but the image's bytes."""
    return json.dumps(dataclasses.asdict(dataclasses.replace(request, image=None))).encode()


def _scalar(inputs: dict[str, np.ndarray | None], name: str) -> Any | None:
    value = inputs.get(name)
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size != 1:
        raise InvalidRequestError(name, f"must hold exactly one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def _text(inputs: dict[str, np.ndarray | None], name: str, max_chars: int) -> str | None:
    raw = _scalar(inputs, name)
    if raw is None:
        return None
    if isinstance(raw, bytes | np.bytes_):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(name, f"must be UTF-8 text (invalid byte at offset {exc.start})") from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise InvalidRequestError(name, "must be a BYTES (UTF-8 string) tensor")
    if len(text) > max_chars:
        raise InvalidRequestError(name, f"must be at most {max_chars} characters, got {len(text)}")
    return text


def _integer(inputs: dict[str, np.ndarray | None], name: str, default: int) -> int:
    raw = _scalar(inputs, name)
    if raw is None:
        return default
    if not isinstance(raw, int | np.integer):
        raise InvalidRequestError(name, f"must be an integer (INT64), got {type(raw).__name__}")
    return int(raw)


def _number(inputs: dict[str, np.ndarray | None], name: str, default: float) -> float:
    raw = _scalar(inputs, name)
    if raw is None:
        return default
    if not isinstance(raw, float | int | np.floating | np.integer):
        raise InvalidRequestError(name, f"must be a number (FP32), got {type(raw).__name__}")
    return float(raw)


def validate_request(
    inputs: dict[str, np.ndarray | None],
    deployment: Deployment,
    spatial_multiple: int,
    temporal_stride: int,
    now_unix_s: float | None = None,
    image_input: ImageInput = "none",
    two_experts: bool = True,
) -> GenerationRequest:
    """Check every input of one request and fill the defaults.

    Args:
        inputs: request tensors by name; an optional input the client left out is absent or None.
        deployment: the limits and defaults.
        spatial_multiple: height and width must be multiples of this (VAE stride x patch size; 16 for Wan2.2).
        temporal_stride: num_frames must be `temporal_stride * k + 1` (4 for Wan2.2).
        now_unix_s: when the request arrived (the deadline's start); the current time when None.
        image_input: what the checkpoint does with `image` (`Checkpoint.image_input`). Only its presence is checked
            here; `wan_triton.model.image` decodes it against the deployment's image limits.
        two_experts: whether the checkpoint has the low-noise expert `transformer_2` that `guidance_scale_2` steers.
    """
    lim, d = deployment.limits, deployment.defaults

    prompt = _text(inputs, "prompt", lim.max_prompt_chars)
    if prompt is None:
        raise InvalidRequestError("prompt", "is required")
    if not prompt.strip():
        raise InvalidRequestError("prompt", "must not be empty or whitespace only")
    negative_prompt = _text(inputs, "negative_prompt", lim.max_prompt_chars)

    height = _integer(inputs, "height", d.height)
    width = _integer(inputs, "width", d.width)
    for name, value, limit in (("height", height, lim.max_height), ("width", width, lim.max_width)):
        if value <= 0 or value % spatial_multiple or value > limit:
            raise InvalidRequestError(
                name, f"must be a positive multiple of {spatial_multiple} pixels, at most {limit}; got {value}"
            )
    if height * width > lim.max_pixels:
        raise InvalidRequestError(
            "height", f"height x width must be at most {lim.max_pixels} pixels; got {height}x{width}={height * width}"
        )

    num_frames = _integer(inputs, "num_frames", d.num_frames)
    if num_frames < 1 or (num_frames - 1) % temporal_stride or num_frames > lim.max_num_frames:
        raise InvalidRequestError(
            "num_frames",
            f"must be {temporal_stride}k+1 (1, {temporal_stride + 1}, {2 * temporal_stride + 1}, ...) "
            f"and at most {lim.max_num_frames}; got {num_frames}",
        )

    steps = _integer(inputs, "num_inference_steps", d.num_inference_steps)
    if not 1 <= steps <= lim.max_num_inference_steps:
        raise InvalidRequestError("num_inference_steps", f"must be in [1, {lim.max_num_inference_steps}]; got {steps}")

    seed = _integer(inputs, "seed", -1)
    if inputs.get("seed") is None:
        if deployment.result_cache_bytes:
            # A request without a seed asks for a fresh random video. Triton's response cache keys on the inputs,
            # so a second seedless request would get the first one's video: with the cache on, seed is required.
            # A failed request is never cached, so no seedless request is ever answered from the cache.
            raise InvalidRequestError("seed", "is required while the server's result cache is on")
        # No seed given: draw one and return it, so the result can still be reproduced.
        seed = secrets.randbelow(2**31)
    elif not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError("seed", f"must be in [0, 2^63-1]; got {seed}")

    if not two_experts and inputs.get("guidance_scale_2") is not None:
        raise InvalidRequestError(
            "guidance_scale_2", "this model has one expert (no transformer_2); send guidance_scale only"
        )
    scales = {}
    for name, default in (("guidance_scale", d.guidance_scale), ("guidance_scale_2", d.guidance_scale_2)):
        value = _number(inputs, name, default)
        if not math.isfinite(value) or not MIN_GUIDANCE_SCALE <= value <= lim.max_guidance_scale:
            raise InvalidRequestError(
                name, f"must be a finite number in [{MIN_GUIDANCE_SCALE:g}, {lim.max_guidance_scale:g}]; got {value}"
            )
        scales[name] = value

    fps = _integer(inputs, "fps", d.fps)
    if not 1 <= fps <= lim.max_fps:
        raise InvalidRequestError("fps", f"must be in [1, {lim.max_fps}]; got {fps}")

    timeout_s = d.timeout_s if inputs.get("timeout_s") is None else _number(inputs, "timeout_s", 0.0)
    if timeout_s is not None and (not math.isfinite(timeout_s) or not 0 < timeout_s <= lim.max_timeout_s):
        raise InvalidRequestError(
            "timeout_s", f"must be a finite number of seconds in (0, {lim.max_timeout_s:g}]; got {timeout_s}"
        )
    deadline = None if timeout_s is None else (time.time() if now_unix_s is None else now_unix_s) + timeout_s

    image = _image(inputs, image_input)

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=d.negative_prompt if negative_prompt is None else negative_prompt,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        seed=seed,
        guidance_scale=scales["guidance_scale"],
        guidance_scale_2=scales["guidance_scale_2"],
        fps=fps,
        timeout_s=timeout_s,
        deadline_unix_s=deadline,
        image=image,
        has_image=image is not None,
    )


def _image(inputs: dict[str, np.ndarray | None], image_input: ImageInput) -> bytes | None:
    """The `image` input's bytes, or None; whether this model takes one. Its content is checked when decoded."""
    raw = _scalar(inputs, "image")
    if raw is None:
        if image_input == "required":
            raise InvalidRequestError("image", "is required by this image-to-video model: a PNG, JPEG or WebP file")
        return None
    if image_input == "none":
        raise InvalidRequestError("image", "this model is text-to-video and takes no image; leave `image` out")
    if not isinstance(raw, bytes | np.bytes_):
        raise InvalidRequestError("image", "must be a BYTES tensor holding a PNG, JPEG or WebP file")
    return bytes(raw)
