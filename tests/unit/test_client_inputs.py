"""Tests for the command-line client: request input building, option mapping, and failing cleanly without a server."""

from __future__ import annotations

import io
import socket
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import wan_client
from wan_client import INPUT_DATATYPES, build_infer_inputs, inputs_from_args, parse_args


def _by_name(values: dict[str, object]) -> dict[str, object]:
    return {infer_input.name(): infer_input for infer_input in build_infer_inputs(values)}


def test_build_infer_inputs_names_datatypes_shapes() -> None:
    values: dict[str, object] = {
        "prompt": "a fox",
        "negative_prompt": "blurry",
        "height": 480,
        "width": 832,
        "num_frames": 81,
        "num_inference_steps": 40,
        "seed": 2**62,
        "guidance_scale": 4.0,
        "guidance_scale_2": 3,
        "fps": 16,
        "timeout_s": 600.0,
        "image": b"\x89PNG",
        "preview": 5,
    }
    inputs = _by_name(values)

    assert set(inputs) == set(INPUT_DATATYPES)
    for name, infer_input in inputs.items():
        assert infer_input.datatype() == INPUT_DATATYPES[name]
        assert list(infer_input.shape()) == [1]
    assert inputs["seed"]._get_content() == np.array([2**62], dtype=np.int64).tobytes()
    assert inputs["guidance_scale_2"]._get_content() == np.array([3.0], dtype=np.float32).tobytes()
    # BYTES tensors are serialized as a 4-byte little-endian length followed by the UTF-8 bytes.
    assert inputs["prompt"]._get_content() == len(b"a fox").to_bytes(4, "little") + b"a fox"


def test_build_infer_inputs_omits_none() -> None:
    inputs = _by_name({"prompt": "a fox", "seed": None, "height": None, "guidance_scale": 5.0})
    assert set(inputs) == {"prompt", "guidance_scale"}


def test_build_infer_inputs_keeps_utf8_and_empty_strings() -> None:
    inputs = _by_name({"prompt": "café", "negative_prompt": ""})
    assert inputs["prompt"]._get_content() == (5).to_bytes(4, "little") + "café".encode()
    assert inputs["negative_prompt"]._get_content() == (0).to_bytes(4, "little")


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"prompt": "x", "steps": 3}, ValueError),
        ({"prompt": "x", "height": 480.5}, TypeError),
        ({"prompt": "x", "seed": True}, TypeError),
        ({"prompt": "x", "seed": 2**63}, ValueError),
        ({"prompt": 7}, TypeError),
        ({"prompt": "x", "guidance_scale": "4"}, TypeError),
    ],
)
def test_build_infer_inputs_rejects_bad_values(values: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        build_infer_inputs(values)


def test_parse_args_maps_options_to_inputs() -> None:
    args = parse_args(
        [
            "--prompt", "a fox",
            "--negative-prompt", "blurry",
            "--height", "480",
            "--width", "832",
            "--num-frames", "81",
            "--steps", "30",
            "--seed", "7",
            "--guidance-scale", "4.5",
            "--guidance-scale-2", "3",
            "--fps", "16",
        ]
    )  # fmt: skip
    assert inputs_from_args(args) == {
        "prompt": "a fox",
        "negative_prompt": "blurry",
        "height": 480,
        "width": 832,
        "num_frames": 81,
        "num_inference_steps": 30,
        "seed": 7,
        "guidance_scale": 4.5,
        "guidance_scale_2": 3.0,
        "fps": 16,
    }
    # `timeout_s` comes from --timeout (sent by `generate`), `preview` only with --stream, `image` with --image.
    assert set(inputs_from_args(args)) == set(INPUT_DATATYPES) - {"timeout_s", "preview", "image"}
    streamed = parse_args(["--prompt", "a fox", "--stream", "--preview-every", "4"])
    assert inputs_from_args(streamed) == {"prompt": "a fox", "preview": 4}


def test_client_inputs_are_the_stream_models_inputs() -> None:
    from wan_triton.serving import model_io

    dtypes = {"TYPE_STRING": "BYTES", "TYPE_INT64": "INT64", "TYPE_FP32": "FP32"}
    served = {io.name: dtypes[io.triton_dtype] for io in model_io.STREAM.inputs}
    assert served == INPUT_DATATYPES


def test_parse_args_sends_only_given_options() -> None:
    args = parse_args(["--prompt", "a fox", "--seed", "0"])
    assert inputs_from_args(args) == {"prompt": "a fox", "seed": 0}
    assert args.url == "localhost:8001"
    assert args.model == "wan_t2v"
    assert args.frames_npy is None
    assert args.timeout is None


def test_parse_args_requires_prompt() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--seed", "1"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_main_without_server_fails_clearly(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    url = f"127.0.0.1:{_free_port()}"
    output = tmp_path / "out.mp4"

    code = wan_client.main(["--url", url, "--prompt", "a fox", "--output", str(output)])

    captured = capsys.readouterr()
    assert code != 0
    assert f"cannot reach Triton at {url}" in captured.err
    assert captured.out == ""
    assert not output.exists()


def test_progress_without_tty_prints_a_line_every_ten_seconds() -> None:
    stream = io.StringIO()
    progress = wan_client.Progress(stream, "generating")
    for tick in range(1, 50):
        progress(tick * 0.5)
    progress.finish()
    assert stream.getvalue().splitlines() == ["generating 10 s", "generating 20 s"]


class _FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Just enough of Triton's gRPC service to exercise the client: health, readiness and ModelInfer."""

    VIDEO = b"\x00\x00\x00\x18ftypisom fake mp4 bytes"
    FRAMES = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    USED_SEED = 1234567

    def __init__(self) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []

    # Method names are fixed by the gRPC service definition.
    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name == "wan_t2v")

    def ModelInfer(self, request, context):
        self.requests.append(request)
        prompt = request.raw_input_contents[[i.name for i in request.inputs].index("prompt")][4:].decode()
        if prompt == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "height: must be a multiple of 16, got 481")
        if prompt == "crash":
            context.abort(grpc.StatusCode.INTERNAL, "CUDA out of memory")
        if prompt == "slow":
            time.sleep(3)
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        for output in request.outputs:
            if output.name == "video":
                response.outputs.add(name="video", datatype="BYTES", shape=[1])
                response.raw_output_contents.append(len(self.VIDEO).to_bytes(4, "little") + self.VIDEO)
            elif output.name == "frames":
                response.outputs.add(name="frames", datatype="UINT8", shape=list(self.FRAMES.shape))
                response.raw_output_contents.append(self.FRAMES.tobytes())
            elif output.name == "used_seed":
                response.outputs.add(name="used_seed", datatype="INT64", shape=[1])
                response.raw_output_contents.append(np.array([self.USED_SEED], dtype=np.int64).tobytes())
        return response


@pytest.fixture
def fake_triton():
    servicer = _FakeTriton()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def test_main_writes_video_and_prints_path(fake_triton, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    url, servicer = fake_triton
    output = tmp_path / "sub" / "fox.mp4"

    code = wan_client.main(["--url", url, "--prompt", "a fox", "--seed", "3", "--output", str(output)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert output.read_bytes() == _FakeTriton.VIDEO
    assert captured.out.splitlines()[-1] == str(output)
    (request,) = servicer.requests
    assert {i.name for i in request.inputs} == {"prompt", "seed"}
    assert [o.name for o in request.outputs] == ["video", "used_seed"]
    assert f", seed {_FakeTriton.USED_SEED}" in captured.err  # the seed the server reports, not the one sent


def test_main_saves_frames_when_asked(fake_triton, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    url, servicer = fake_triton
    frames_path = tmp_path / "frames.npy"

    code = wan_client.main(
        ["--url", url, "--prompt", "a fox", "--output", str(tmp_path / "o.mp4"), "--frames-npy", str(frames_path)]
    )

    assert code == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.load(frames_path), _FakeTriton.FRAMES)
    assert sorted(o.name for o in servicer.requests[0].outputs) == ["frames", "used_seed", "video"]


@pytest.mark.parametrize(
    ("argv", "exit_code", "message"),
    [
        (["--prompt", "invalid"], 2, "request rejected: height: must be a multiple of 16"),
        (["--prompt", "crash"], 1, "CUDA out of memory"),
        (["--prompt", "x", "--model", "other"], 1, "model 'other' is not ready"),
        # A server that ignores `timeout_s`: the gRPC deadline (timeout + grace) ends the call.
        (["--prompt", "slow", "--timeout", "0.5"], wan_client.EXIT_DEADLINE, "timed out after 0.5 s"),
    ],
)
def test_main_reports_failures(
    fake_triton,
    capsys: pytest.CaptureFixture[str],
    monkeypatch,
    tmp_path,
    argv: list[str],
    exit_code: int,
    message: str,
) -> None:
    url, servicer = fake_triton
    output = tmp_path / "out.mp4"
    monkeypatch.setattr(wan_client.client, "DEADLINE_GRACE_S", 0.5)

    code = wan_client.main(["--url", url, "--output", str(output), *argv])

    captured = capsys.readouterr()
    assert code == exit_code
    assert message in captured.err
    assert captured.out == ""
    assert not output.exists()
    if "--timeout" in argv:  # the deadline travels to the server as `timeout_s`
        assert "timeout_s" in {i.name for i in servicer.requests[0].inputs}


class _StreamResult:
    def __init__(self, **outputs: object) -> None:
        self.outputs = {
            name: np.array([value], dtype=object if isinstance(value, bytes) else None)
            for name, value in outputs.items()
        }

    def as_numpy(self, name: str):
        return self.outputs.get(name)


class _FakeStreamClient:
    """A tritonclient gRPC client whose stream answers with scripted (result, error) callbacks; records how the
    stream was closed."""

    def __init__(self, answers: list) -> None:
        self.answers = answers
        self.cancel_requests: list[bool] = []

    def is_server_live(self, client_timeout=None) -> bool:
        return True

    def is_model_ready(self, model, client_timeout=None) -> bool:
        return model == "wan_t2v_stream"

    def start_stream(self, callback) -> None:
        self.callback = callback

    def async_stream_infer(self, model, inputs, outputs=None) -> None:
        for result, error in self.answers:
            self.callback(result=result, error=error)

    def stop_stream(self, cancel_requests: bool = False) -> None:
        self.cancel_requests.append(cancel_requests)

    def close(self) -> None:
        pass


def _progress(stage: bytes = b"denoise", step: int = 1) -> _StreamResult:
    return _StreamResult(stage=stage, step=step, num_steps=4, elapsed_s=0.1)


@pytest.mark.parametrize(
    ("answers", "exit_code", "cancelled"),
    [
        # The server ended the request with an error (its final response): nothing is left to cancel. Cancelling
        # anyway is what makes Triton 2.51 leak the request and keep the stream model from unloading.
        (
            [(_progress(), None), (None, InferenceServerException("[CANCELLED] timeout_s: deadline exceeded: 1.5 s"))],
            wan_client.EXIT_DEADLINE,
            False,
        ),
        (
            [(None, InferenceServerException("[INVALID_ARG] height: must be a multiple of 16"))],
            wan_client.EXIT_INVALID_ARGUMENT,
            False,
        ),
        # A malformed progress response: the client leaves while the request still runs, so it cancels it.
        ([(_progress(), None), (_StreamResult(step=2), None)], wan_client.EXIT_FAILURE, True),
    ],
)
def test_stream_is_cancelled_only_while_its_request_runs(monkeypatch, answers, exit_code, cancelled) -> None:
    fake = _FakeStreamClient(answers)
    monkeypatch.setattr(wan_client.client, "_connect", lambda url: fake)
    with pytest.raises(wan_client.GenerateError) as caught:
        wan_client.generate_stream("fake:8001", "wan_t2v", {"prompt": "a fox"}, False, 1.5)
    assert caught.value.exit_code == exit_code
    assert fake.cancel_requests == [cancelled]


def test_finished_stream_is_closed_without_cancelling(monkeypatch) -> None:
    video = b"\x00\x00\x00\x18ftypisom"
    done = _StreamResult(stage=b"done", step=4, num_steps=4, elapsed_s=1.0, video=video, used_seed=42)
    fake = _FakeStreamClient([(_progress(), None), (done, None)])
    monkeypatch.setattr(wan_client.client, "_connect", lambda url: fake)
    result = wan_client.generate_stream("fake:8001", "wan_t2v", {"prompt": "a fox"}, False, None)
    assert result.video == video and result.used_seed == 42
    assert fake.cancel_requests == [False]


# A few bytes that are not valid UTF-8 and hold a NUL at the end: an image goes byte for byte.
IMAGE = b"\x89PNG\r\n\x1a\n\xff\xfe\x00 image bytes\x00"


def test_build_infer_inputs_sends_the_image_bytes_as_they_are() -> None:
    for inputs in (
        build_infer_inputs({"prompt": "a fox"}, image=IMAGE),
        build_infer_inputs({"prompt": "a", "image": IMAGE}),
    ):
        (image,) = [i for i in inputs if i.name() == "image"]
        assert image.datatype() == "BYTES" and image.shape() == [1]
        assert image._get_content() == len(IMAGE).to_bytes(4, "little") + IMAGE


def test_build_infer_inputs_refuses_a_path_as_image() -> None:
    with pytest.raises(TypeError, match="image must be the file's bytes"):
        build_infer_inputs({"prompt": "a fox", "image": "/tmp/photo.png"})


def test_main_sends_the_image_file(fake_triton, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    url, servicer = fake_triton
    photo = tmp_path / "photo.png"
    photo.write_bytes(IMAGE)
    code = wan_client.main(
        ["--url", url, "--prompt", "a fox", "--image", str(photo), "--output", str(tmp_path / "o.mp4")]
    )
    assert code == 0, capsys.readouterr().err
    (request,) = servicer.requests
    names = [i.name for i in request.inputs]
    assert request.raw_input_contents[names.index("image")] == len(IMAGE).to_bytes(4, "little") + IMAGE


def test_main_with_a_missing_image_file_fails_before_sending(fake_triton, capsys, tmp_path) -> None:
    url, servicer = fake_triton
    missing = tmp_path / "nowhere.png"
    code = wan_client.main(["--url", url, "--prompt", "a fox", "--image", str(missing)])
    assert code == wan_client.EXIT_INVALID_ARGUMENT
    assert f"cannot read --image {missing}" in capsys.readouterr().err
    assert servicer.requests == []
