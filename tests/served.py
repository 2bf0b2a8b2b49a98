"""The test session's Triton server (the `server` fixture of tests/conftest.py): the models it serves, and the
clients' view of it: its metrics page and a gRPC stream."""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from factories import DEPLOYMENTS_DIR, LONGEST_CPU
from wan_bench.metrics import all_samples, metrics_text
from wan_client import build_infer_inputs

# Two renderings of the non-default tiny checkpoint, both engine families, under these model names.
DEPLOYMENTS = {
    "wan_onnx": DEPLOYMENTS_DIR / "cpu.yaml",
    "wan_torch": DEPLOYMENTS_DIR / "cpu_torch.yaml",
}
# Queue and batching settings of each rendering (tests/server/test_queue_batching.py): `wan_onnx` batches up to 8
# same-shape requests; `wan_torch` runs one at a time with one waiting, so a third concurrent request is refused.
SERVING = {
    "wan_onnx": {"max_batch_size": 8, "max_queue_size": 16},
    "wan_torch": {"max_batch_size": 1, "max_queue_size": 1},
}

# Which step encodes each rendering's MP4 (deployment `video.encode_while_decoding`): postprocess after the whole
# decode for `wan_onnx`, the vae_decoder step while it decodes for `wan_torch` (and IMAGE_MODEL, made from it).
ENCODE_WHILE_DECODING = {"wan_onnx": False, "wan_torch": True}

# Also served: a parallel plan (a worker group of 2 gloo processes, tp 2) of the 4-head checkpoint `tiny4`.
PARALLEL_MODEL = "wan_parallel"
PARALLEL_DEPLOYMENT = DEPLOYMENTS_DIR / "cpu_parallel.yaml"

# A third rendering with the result cache on (tests/server/test_result_cache.py): cpu.yaml plus result_cache_bytes.
CACHED_MODEL = "wan_cached"
CACHED_BYTES = 64 << 20

# A rendering that takes the `image` input (tests/server/test_image_input.py): cpu_torch.yaml over the TI2V
# checkpoint `ti2v_checkpoint` (tests/conftest.py: the image is optional, one expert, sizes in multiples of 32),
# batching up to 4 same-shape requests that arrive within the batcher's delay of each other, the result cache on,
# and image limits small enough that a test reaches them cheaply.
IMAGE_MODEL = "wan_image"
# The batcher waits 200 ms for more requests; tests that need requests batched queue them behind a blocker
# (below), as a loaded 2-core machine can deliver three requests sent together seconds apart.
IMAGE_SERVING = {"max_batch_size": 4, "max_queue_size": 8, "max_queue_delay_ms": 200.0}
IMAGE_LIMITS = {"max_image_bytes": 64 << 10, "max_image_pixels": 512 * 512, "max_num_inference_steps": 400}
# The TI2V checkpoint is small enough that even LONGEST_CPU takes under 3 s on 2 idle cores: its blocker (below) runs
# 400 steps instead, eight times as long, and is cancelled once the requests it holds back are queued.
IMAGE_BLOCKER = dict(prompt="a long image request that keeps the scheduler busy", seed=53, **LONGEST_CPU)
IMAGE_BLOCKER["num_inference_steps"] = IMAGE_LIMITS["max_num_inference_steps"]
IMAGE_CACHE_BYTES = 32 << 20


# The server tests' request: every setting differs from the deployment defaults, so an input that is dropped on
# the way to the pipeline shows in the frames.
REQUEST = dict(
    prompt="a small robot dances in the rain, close-up",
    negative_prompt="blurry, static",
    height=48,
    width=80,
    num_frames=13,
    num_inference_steps=7,
    guidance_scale=3.5,
    guidance_scale_2=2.5,
    seed=1234,
)


def metric_samples(server) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the server's /metrics page: (name, labels, value)."""
    return all_samples(metrics_text(server.metrics_port))


def metric_value(samples, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`; there must be one."""
    values = [v for n, got, v in samples if n == name and labels.items() <= got.items()]
    assert values, f"no sample {name}{labels}"
    return sum(values)


def infer(client, model: str, request: dict, outputs=("frames", "video", "used_seed")):
    """One unary request (a dict of the client's inputs) through a gRPC client, asking for `outputs`."""
    wanted = [grpcclient.InferRequestedOutput(o) for o in outputs]
    return client.infer(model, build_infer_inputs(request), outputs=wanted)


def infer_timed(server, model: str, request: dict):
    """(finish time, frames or the exception); one client per call, as concurrent clients would."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        try:
            frames = infer(client, model, request, ("frames",)).as_numpy("frames")
            return time.perf_counter(), frames
        except InferenceServerException as exc:
            return time.perf_counter(), exc


# The progress outputs of the stream model, and how long a test waits for a response or a stop.
PROGRESS = ("stage", "step", "num_steps", "elapsed_s", "preview_frame")
STOP_WAIT_S = 120.0
# Triton's exit timeout for the test servers: on the 2-core test machine, loaded by the tests beside them, two dozen
# stubs can take longer than the product's 30 s default to exit (the unload itself completes).
TEST_EXIT_TIMEOUT_S = 120


class Stream:
    """One gRPC stream: send requests, read each response (result or error) in order."""

    def __init__(self, url: str, model: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, request: dict, outputs=("video", "frames", "used_seed", *PROGRESS)) -> None:
        wanted = [grpcclient.InferRequestedOutput(o) for o in outputs]
        self.client.async_stream_infer(self.model, build_infer_inputs(request), outputs=wanted)

    def next(self, timeout_s: float = STOP_WAIT_S):
        return self.responses.get(timeout=timeout_s)

    def until_final(self) -> tuple[list, object]:
        """Progress results up to the final one (stage "done"), or raise the stream's error."""
        progress = []
        while True:
            result, error = self.next()
            if error is not None:
                raise error
            progress.append(result)
            if result.as_numpy("stage")[0] == b"done":
                return progress[:-1], result

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


# Concurrency on a shared 2-core machine is made deterministic with a "blocker": a long request on the stream endpoint
# holds the scheduler while the requests under test arrive and queue, one after another, however slowly; then it is
# cancelled, and the scheduler gets them together. The blocker is the largest request the CPU deployments allow, so
# that it outlasts their arrival on any machine; cancelled, it stops after its current step.
BLOCKER = dict(prompt="a long request that keeps the scheduler busy", seed=1, **LONGEST_CPU)


def scheduler_queue(server, model: str) -> int:
    """How many requests wait in the queue of `model`'s scheduler (Triton's pending-request gauge)."""
    samples = metric_samples(server)
    return int(metric_value(samples, "nv_inference_pending_request_count", model=f"{model}_scheduler"))


def behind_blocker(server, model: str, requests: list[dict], blocker: dict = BLOCKER):
    """Start `blocker` on `model`'s stream endpoint; once its loop runs, send each request after the one before it
    is queued (or answered: refused), so that they queue in list order; then cancel the blocker. Each request's
    (finish time, frames or the exception), and when the blocker was cancelled."""
    stream = Stream(server.grpc_url, f"{model}_stream")
    cancelled = None
    try:
        stream.send(blocker, outputs=PROGRESS)
        step = 0
        while step < 1:
            result, error = stream.next()
            assert error is None, error
            step = int(result.as_numpy("step")[0]) if result.as_numpy("stage")[0] == b"denoise" else 0
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = []
            for request in requests:
                futures.append(pool.submit(infer_timed, server, model, request))
                deadline = time.monotonic() + STOP_WAIT_S
                while scheduler_queue(server, model) + sum(f.done() for f in futures) < len(futures):
                    assert time.monotonic() < deadline, f"request {len(futures)} never reached the scheduler's queue"
                    time.sleep(0.05)
            cancelled = time.perf_counter()
            stream.close(cancel=True)
            return [f.result() for f in futures], cancelled
    finally:
        if cancelled is None:
            stream.close(cancel=True)
