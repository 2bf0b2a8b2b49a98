"""Served frames of an image-conditioned kind against diffusers, through the real server.

`wan_image` (tests/served.py) serves the tiny TI2V-5B checkpoint of tests/conftest.py on the torch engine in fp32:
given a PNG or a JPEG its `frames` must equal diffusers' `WanImageToVideoPipeline` loaded from the same checkpoint
and given the same file decoded as `diffusers.utils.load_image` decodes it (the pipeline then resizes it itself);
without an image, `WanPipeline`. Tolerance: `checks.assert_frames_close` (2 uint8 levels at most, 0.5 on average).
The in-process pipeline is checked the same way on both engines and for I2V-A14B in
tests/unit/test_family_pipeline.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from diffusers.utils import load_image
from PIL import Image

from checks import assert_frames_close, reference_frames, reference_i2v_frames
from served import IMAGE_MODEL, infer

# Every setting explicit, so diffusers gets exactly what the server ran (wan_image keeps its result cache on: a
# seed is required). Sizes are multiples of 32 (the Wan2.2 VAE's 16x times patch 2).
CALL = dict(
    prompt="a heron lands on a lake",
    negative_prompt="blurry",
    height=32,
    width=64,
    num_frames=5,
    num_inference_steps=3,
    guidance_scale=4.0,
    seed=23,
)


def _picture(fmt: str) -> bytes:
    """A picture of another size and aspect than the request's (the server stretches it), in `fmt`."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(base).resize((45, 30), Image.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _served(server, request: dict) -> np.ndarray:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return infer(client, IMAGE_MODEL, request, outputs=("frames",)).as_numpy("frames")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_ti2v_with_an_image_equals_wan_image_to_video_pipeline(server, ti2v_checkpoint, fmt):
    data = _picture(fmt)
    served = _served(server, {**CALL, "image": data})
    reference = reference_i2v_frames(ti2v_checkpoint, load_image(Image.open(io.BytesIO(data))), **CALL)
    assert_frames_close(served, reference)
    # The image matters: the same request without it is another video.
    alone = _served(server, CALL)
    assert np.abs(alone.astype(np.int16) - served.astype(np.int16)).max() > 10


def test_ti2v_without_an_image_equals_wan_pipeline(server, ti2v_checkpoint):
    assert_frames_close(_served(server, CALL), reference_frames(ti2v_checkpoint, **CALL))
