"""The real Triton server, end to end: parity with diffusers' WanPipeline, the MP4, and every kind of bad input.

The session's server (tests/conftest.py, tests/served.py) holds two renderings of the same non-default tiny
checkpoint: `wan_onnx` (every component on ONNX Runtime) and `wan_torch` (the library modules in PyTorch), so both
engine families are checked against the reference in one server start.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from checks import assert_frames_close, reference_frames
from served import DEPLOYMENTS, REQUEST, infer, metric_samples, metric_value
from wan_triton.config.deployment import Deployment
from wan_triton.model.video import decode_mp4, encode_mp4


@pytest.fixture(scope="module")
def reference(other_checkpoint) -> np.ndarray:
    call = {k: v for k, v in REQUEST.items()}
    return reference_frames(other_checkpoint, **call)


@pytest.mark.parametrize("model", list(DEPLOYMENTS))
def test_frames_match_wan_pipeline(client, reference, model):
    result = infer(client, model, REQUEST)
    frames = result.as_numpy("frames")
    assert frames.shape == (13, 48, 80, 3)
    assert_frames_close(frames, reference)
    assert int(result.as_numpy("used_seed")[0]) == REQUEST["seed"]
    video = result.as_numpy("video")[0]
    decoded = decode_mp4(video)
    assert decoded.shape == frames.shape
    # H.264 yuv420p halves chroma resolution, which random-weight (noise-like) colour cannot survive; luma keeps
    # full resolution, so at CRF 17 it stays close to the frames the MP4 was made from.
    assert np.abs(_luma(decoded) - _luma(frames)).mean() < 3
    # Encoded after the decode (wan_onnx) or chunk by chunk while it ran (wan_torch), the MP4 is the one of the frames.
    deployment = Deployment.load(DEPLOYMENTS[model])
    settings = deployment.video
    assert video == encode_mp4(
        frames, deployment.defaults.fps, settings.x264_preset, settings.x264_crf, settings.x264_tune
    )


def _luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


def test_same_request_same_frames_and_defaults(client):
    first = infer(client, "wan_onnx", {"prompt": "a bird flies over the ocean", "seed": 5})
    second = infer(client, "wan_onnx", {"prompt": "a bird flies over the ocean", "seed": 5})
    np.testing.assert_array_equal(first.as_numpy("frames"), second.as_numpy("frames"))
    # Left-out inputs take the deployment's defaults.
    d = Deployment.load(DEPLOYMENTS["wan_onnx"]).defaults
    assert first.as_numpy("frames").shape == (d.num_frames, d.height, d.width, 3)


def test_no_seed_draws_one_and_reports_it(client):
    drawn = infer(client, "wan_onnx", {"prompt": "a bird", "num_inference_steps": 1, "num_frames": 1})
    seed = int(drawn.as_numpy("used_seed")[0])
    again = infer(client, "wan_onnx", {"prompt": "a bird", "num_inference_steps": 1, "num_frames": 1, "seed": seed})
    np.testing.assert_array_equal(drawn.as_numpy("frames"), again.as_numpy("frames"))


BAD_REQUESTS = [
    ({"height": 50}, "height", "multiple of 16"),
    ({"height": 0}, "height", "positive multiple"),
    ({"width": -16}, "width", "positive multiple"),
    ({"height": 528}, "height", "at most 512"),
    ({"height": 512, "width": 512}, "height", "at most 147456 pixels"),
    ({"num_frames": 10}, "num_frames", "4k+1"),
    ({"num_frames": 37}, "num_frames", "at most 33"),
    ({"num_frames": 0}, "num_frames", "4k+1"),
    ({"num_inference_steps": 0}, "num_inference_steps", "[1, 50]"),
    ({"num_inference_steps": 51}, "num_inference_steps", "[1, 50]"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "finite number in [0, 50]"),
    ({"guidance_scale": float("inf")}, "guidance_scale", "finite number in [0, 50]"),
    ({"guidance_scale": -1.0}, "guidance_scale", "[0, 50]"),
    ({"guidance_scale_2": 50.5}, "guidance_scale_2", "[0, 50]"),
    ({"seed": -3}, "seed", "[0, 2^63-1]"),
    ({"fps": 0}, "fps", "[1, 120]"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": " \n\t "}, "prompt", "empty"),
    ({"prompt": b"caf\xe9 \xff"}, "prompt", "UTF-8"),
    ({"negative_prompt": b"\xc3\x28"}, "negative_prompt", "UTF-8"),
    ({"prompt": "a" * 2001}, "prompt", "at most 2000 characters"),
]


@pytest.mark.parametrize(("change", "field", "allowed"), BAD_REQUESTS, ids=[f"{c}"[:40] for c, _, _ in BAD_REQUESTS])
def test_bad_input_is_invalid_arg(client, change, field, allowed):
    with pytest.raises(InferenceServerException) as info:
        infer(client, "wan_onnx", {**REQUEST, **change})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    assert f"{field}:" in info.value.message() and allowed in info.value.message(), info.value.message()


def _raw_inputs(**tensors):
    inputs = []
    for name, (array, datatype) in tensors.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@pytest.mark.parametrize(
    ("inputs", "mentions"),
    [
        ({"seed": (np.array([1], dtype=np.int64), "INT64")}, "prompt"),  # the required input left out
        ({"prompt": (np.array([b"a", b"b"], dtype=object), "BYTES")}, "prompt"),  # two prompts in one request
        (
            {"prompt": (np.array([b"a"], dtype=object), "BYTES"), "height": (np.array([64.0], np.float32), "FP32")},
            "height",
        ),
    ],
    ids=["missing-prompt", "two-prompts", "height-as-fp32"],
)
def test_malformed_tensors_are_invalid_arg(client, inputs, mentions):
    with pytest.raises(InferenceServerException) as info:
        client.infer("wan_onnx", _raw_inputs(**inputs))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    assert mentions in info.value.message()


def test_still_serving_the_same_frames_after_bad_input(client, reference):
    # Runs after the bad-input tests (file order): the server is up and its output unchanged.
    assert_frames_close(infer(client, "wan_onnx", REQUEST).as_numpy("frames"), reference)
    assert_frames_close(infer(client, "wan_torch", REQUEST).as_numpy("frames"), reference)


def test_metrics_report_stages_outcomes_and_rate(server, client):
    infer(client, "wan_onnx", {"prompt": "metrics", "num_inference_steps": 2, "num_frames": 1})
    with pytest.raises(InferenceServerException):
        infer(client, "wan_onnx", {"prompt": "metrics", "num_frames": 2})
    samples = metric_samples(server)
    for stage in ("preprocess", "text_encoder", "scheduler", "vae_decoder", "postprocess"):
        assert metric_value(samples, "wan_stage_seconds_count", model="wan_onnx", stage=stage) >= 1
        assert metric_value(samples, "wan_stage_seconds_sum", model="wan_onnx", stage=stage) > 0
    assert metric_value(samples, "wan_requests_total", model="wan_onnx", stage="preprocess", outcome="invalid_arg") >= 1
    assert metric_value(samples, "wan_requests_total", model="wan_onnx", stage="postprocess", outcome="success") >= 1
    assert metric_value(samples, "wan_denoise_steps_per_second", model="wan_onnx") > 0
    # Triton's own queue gauge sits beside ours.
    assert metric_value(samples, "nv_inference_pending_request_count", model="wan_onnx_scheduler") == 0


def test_warm_up_ran_before_the_server_reported_ready(server):
    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    ready = log.index("Started GRPCInferenceService")
    for model in ("wan_onnx_scheduler", "wan_onnx_vae_decoder", "wan_torch_scheduler", "wan_torch_vae_decoder"):
        warm = log.find(f"{model} warm-up")
        assert 0 <= warm < ready, model


def _nice_values(pid: int) -> dict[int, int]:
    """Thread id -> nice value, of every thread of process `pid`."""
    values = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        # "tid (comm) state ...": the nice value is the 17th field after the command's closing parenthesis.
        values[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[16])
    return values


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return children


def test_every_stub_runs_its_model_below_its_health_thread(server):
    # The rendered model.py lowers the priority of the stub's main thread and of every thread it starts, below the
    # health thread Triton's Python backend must see running (docs/triton-2.51-notes.md).
    (tritonserver,) = _children(server.process.pid)  # the launcher's one child
    stubs = _children(tritonserver)
    assert len(stubs) >= 10, stubs
    for stub in stubs:
        nice = _nice_values(stub)
        assert nice[stub] == 5, (stub, nice)  # the main thread
        assert sorted(nice.values()).count(0) == 1, (stub, nice)  # the health thread alone
        assert set(nice.values()) == {0, 5}, (stub, nice)


def test_request_for_the_video_alone(client):
    # What the client asks for by default. An ensemble drops outputs nobody requested, so this catches a step that
    # reads a tensor only the client was meant to receive.
    result = infer(client, "wan_onnx", {**REQUEST, "num_inference_steps": 1}, outputs=("video",))
    assert decode_mp4(result.as_numpy("video")[0]).shape == (13, 48, 80, 3)
    assert result.as_numpy("frames") is None
