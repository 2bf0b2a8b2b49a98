"""Served frames of the image-conditioned kinds against diffusers, through the real server, on both engines.

This module's own server serves the tiny I2V-A14B and TI2V-5B checkpoints of tests/conftest.py (sizes unlike the
`tiny-*` defaults) from `cpu_torch.yaml` and `cpu.yaml` (ONNX Runtime, the VAE encoder exported too), fp32. Given a
PNG or a JPEG, their `frames` must equal diffusers' `WanImageToVideoPipeline` loaded from the same checkpoint and
given the same file decoded as `diffusers.utils.load_image` decodes it (the pipeline then resizes it itself); TI2V
without an image, `WanPipeline`. Tolerance: `checks.assert_frames_close` (2 uint8 levels at most, 0.5 on average).
The serving features with an image (streaming, deadlines, batching, cache) are in tests/server/test_image_input.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from diffusers.utils import load_image
from PIL import Image

from checks import assert_frames_close, reference_frames, reference_i2v_frames
from factories import DEPLOYMENTS_DIR, build_repository
from served import TEST_EXIT_TIMEOUT_S, infer
from wan_triton.config.deployment import Deployment
from wan_triton.tritonserver.launch import running_server

# Four small renderings: `make test` runs this module beside the session's server.
pytestmark = pytest.mark.beside_session_server

# Every setting explicit, so diffusers gets exactly what the server ran. Sizes are multiples of 32 (TI2V: the Wan2.2
# VAE's 16x times patch 2; I2V needs 16); guidance on, and enough steps for both I2V experts to run. TI2V-5B has one
# expert, so no guidance_scale_2 (the server refuses it).
CALL = dict(
    prompt="a heron lands on a lake",
    negative_prompt="blurry",
    height=32,
    width=64,
    num_frames=5,
    num_inference_steps=4,
    guidance_scale=4.0,
    seed=23,
)
CALLS = {"i2v": {**CALL, "guidance_scale_2": 3.0}, "ti2v": CALL}
# model name -> (kind, shipped deployment)
MODELS = {
    "wan_i2v_torch": ("i2v", "cpu_torch"),
    "wan_i2v_onnx": ("i2v", "cpu"),
    "wan_ti2v_torch": ("ti2v", "cpu_torch"),
    "wan_ti2v_onnx": ("ti2v", "cpu"),
}


def _picture(fmt: str) -> bytes:
    """A picture of another size and aspect than the request's (the server stretches it), in `fmt`."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(base).resize((45, 30), Image.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def family_server(request, artifacts_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("family_server")
    repos, checkpoints = [], {}
    for name, (kind, base) in MODELS.items():
        checkpoint = request.getfixturevalue(f"{kind}_checkpoint")
        checkpoints[name] = checkpoint
        data = Deployment.load(DEPLOYMENTS_DIR / f"{base}.yaml").model_dump(mode="json")
        data.update(model_name=name, warmup=[])
        repos.append(build_repository(checkpoint, Deployment.model_validate(data), root, artifacts_root))
    # The ONNX renderings run the exported VAE encoder: the image goes through a graph, not through PyTorch.
    for name in ("wan_i2v_onnx", "wan_ti2v_onnx"):
        assert list((root / f"repo_{name}").glob("*_scheduler/1/vae_encoder_phase*.onnx")), name
    with running_server(
        repos, root / "tritonserver.log", ready_timeout_s=600, exit_timeout_s=TEST_EXIT_TIMEOUT_S
    ) as running:
        yield running, checkpoints
    assert running.process.returncode == 0, running.shutdown_report()


_references: dict[tuple, np.ndarray] = {}


def _reference(model: str, checkpoint, fmt: str | None) -> np.ndarray:
    """diffusers' frames for the model's call with the picture in `fmt` (None: no image), once per kind and
    picture (both engines of a kind serve the same checkpoint)."""
    kind = MODELS[model][0]
    key = (kind, fmt)
    if key not in _references:
        if fmt is None:
            _references[key] = reference_frames(checkpoint, **CALLS[kind])
        else:
            image = load_image(Image.open(io.BytesIO(_picture(fmt))))
            _references[key] = reference_i2v_frames(checkpoint, image, **CALLS[kind])
    return _references[key]


def _served(running, model: str, request: dict) -> np.ndarray:
    with grpcclient.InferenceServerClient(running.grpc_url) as client:
        return infer(client, model, request, outputs=("frames",)).as_numpy("frames")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("model", list(MODELS))
def test_an_image_request_equals_wan_image_to_video_pipeline(family_server, model, fmt):
    running, checkpoints = family_server
    served = _served(running, model, {**CALLS[MODELS[model][0]], "image": _picture(fmt)})
    assert_frames_close(served, _reference(model, checkpoints[model], fmt))


@pytest.mark.parametrize("model", ["wan_ti2v_torch", "wan_ti2v_onnx"])
def test_ti2v_without_an_image_equals_wan_pipeline(family_server, model):
    running, checkpoints = family_server
    served = _served(running, model, CALLS["ti2v"])
    assert_frames_close(served, _reference(model, checkpoints[model], None))
    # The image matters: the same request with one is another video.
    with_image = _reference(model, checkpoints[model], "PNG")
    assert np.abs(with_image.astype(np.int16) - served.astype(np.int16)).max() > 10
