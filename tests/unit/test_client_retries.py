"""The client's retries (`retries=`, `--retries`) against real gRPC failures: nothing listening on the port, and an
in-process gRPC server speaking Triton's protocol that answers with the status codes under test."""

from __future__ import annotations

import struct
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from wan_client import EXIT_INVALID_ARGUMENT, RETRY_BACKOFF_S, GenerateError, generate, parse_args
from wan_triton.tritonserver.launch import free_port

VIDEO = b"\x00\x00\x00\x18ftypmp42 not a real video"
INPUTS = {"prompt": "a fox", "seed": 7}


class _Triton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Live and ready; ModelInfer fails with each code of `failures` in turn, then answers with a video."""

    def __init__(self, failures: list[grpc.StatusCode]) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.lock = threading.Lock()

    def ServerLive(self, request, context):  # noqa: N802 - the gRPC method's name
        return service_pb2.ServerLiveResponse(live=True)

    def ModelReady(self, request, context):  # noqa: N802
        return service_pb2.ModelReadyResponse(ready=True)

    def ModelInfer(self, request, context):  # noqa: N802
        with self.lock:
            self.calls += 1
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            context.abort(failure, f"failure {self.calls}")
        out = service_pb2.ModelInferResponse.InferOutputTensor
        return service_pb2.ModelInferResponse(
            model_name=request.model_name,
            outputs=[
                out(name="video", datatype="BYTES", shape=[1]),
                out(name="used_seed", datatype="INT64", shape=[1]),
            ],
            raw_output_contents=[
                struct.pack("<I", len(VIDEO)) + VIDEO,  # Triton BYTES: each element's length, then the element
                np.array([7], dtype=np.int64).tobytes(),
            ],
        )


@pytest.fixture
def triton():
    servers = []

    def start(failures: list[grpc.StatusCode]) -> tuple[str, _Triton]:
        servicer = _Triton(failures)
        server = grpc.server(futures.ThreadPoolExecutor(4))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for server in servers:
        server.stop(0)


def _generate(url: str, **options):
    retried: list[GenerateError] = []
    options.setdefault("timeout_s", None)
    result = generate(url, "wan_t2v", INPUTS, want_frames=False, on_retry=lambda _n, e: retried.append(e), **options)
    return result, retried


def test_unavailable_is_retried_with_backoff_until_it_succeeds(triton):
    url, servicer = triton([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE])
    started = time.monotonic()
    result, retried = _generate(url, retries=3)
    assert result.video == VIDEO and result.used_seed == 7
    assert servicer.calls == 3 and len(retried) == 2
    assert all(e.retryable and "failure" in str(e) for e in retried)
    assert time.monotonic() - started >= RETRY_BACKOFF_S * (1 + 2)  # 0.5 s, then 1 s


def test_retries_run_out_and_the_last_error_is_raised(triton):
    url, servicer = triton([grpc.StatusCode.UNAVAILABLE] * 5)
    with pytest.raises(GenerateError, match="failure 2") as caught:
        _generate(url, retries=1)
    assert caught.value.retryable and servicer.calls == 2


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED]
)
def test_other_errors_are_never_retried(triton, code):
    url, servicer = triton([code])
    with pytest.raises(GenerateError) as caught:
        _generate(url, retries=3)
    assert servicer.calls == 1 and not caught.value.retryable
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert caught.value.exit_code == EXIT_INVALID_ARGUMENT


def test_no_retry_starts_past_the_deadline(triton):
    url, servicer = triton([grpc.StatusCode.UNAVAILABLE] * 10)
    started = time.monotonic()
    with pytest.raises(GenerateError):
        _generate(url, retries=10, timeout_s=1.2)
    # 0.5 s wait, second attempt; the next wait (1 s) would end past the deadline, so it stops there.
    assert servicer.calls == 2
    assert time.monotonic() - started < 1.2


def test_a_refused_connection_is_retried():
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    retried: list[int] = []
    with pytest.raises(GenerateError, match="cannot reach") as caught:
        generate(url, "wan_t2v", INPUTS, False, None, retries=2, on_retry=lambda n, _e: retried.append(n))
    assert caught.value.retryable and retried == [1, 2]


def test_the_cli_option():
    assert parse_args(["--prompt", "p"]).retries == 0
    assert parse_args(["--prompt", "p", "--retries", "3"]).retries == 3
    with pytest.raises(SystemExit):
        parse_args(["--prompt", "p", "--retries", "-1"])
