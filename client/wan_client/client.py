"""Command-line gRPC client for the Wan2.2 video ensembles (`wan_t2v` and the image-to-video kinds) served by Triton.

Sends one generation request, shows elapsed time on stderr while the server works (a request can take minutes),
writes the returned MP4 and prints its path as the last line of stdout. Only options the user gives are sent; the
server fills the rest with its defaults.

    python -m wan_client --prompt "a red fox running through snow" --seed 42 --output fox.mp4

With --image PATH the file's bytes go as the `image` input (image-to-video models; the client reads the file, the
server never reads paths).

With --stream the request goes to the streaming endpoint (`<model>_stream`): the client shows the denoising step as
a progress bar and, with --preview-every K --preview-dir DIR, saves a small preview frame every K steps (PPM files).
Ctrl-C cancels the request on the server (it stops within one denoising step).

--retries N sends a request again, up to N times, when it failed for want of a server: the connection failed or
broke, or the server answered UNAVAILABLE (queue full, stopping, a load balancer with no replica left). It waits
RETRY_BACKOFF_S before the first retry, twice as long before each next one, and never past --timeout; a rejected
request (INVALID_ARG) or any other error is never sent again. Behind a load balancer the retry reaches another
replica. With a seed, a retried request returns the same video.

Exit codes: 0 success, 2 the server rejected the request as invalid (the message names the field), 3 the server is
busy (its queue is full; try again later), 4 the request's deadline (--timeout) passed, 130 interrupted, 1 any other
failure (server unreachable, model not ready, server error).
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

logger = logging.getLogger("wan_client")

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = "wan_t2v"
DEFAULT_OUTPUT = "output.mp4"

# The server's request contract: every input has shape [1] (the model has no batching dimension).
INPUT_DATATYPES: dict[str, str] = {
    "prompt": "BYTES",
    "negative_prompt": "BYTES",
    "height": "INT64",
    "width": "INT64",
    "num_frames": "INT64",
    "num_inference_steps": "INT64",
    "seed": "INT64",
    "guidance_scale": "FP32",
    "guidance_scale_2": "FP32",
    "fps": "INT64",
    "timeout_s": "FP32",
    "image": "BYTES",  # the conditioning image's file bytes (PNG, JPEG or WebP): image-to-video models
    "preview": "INT64",  # the stream model only
}

# argparse destination -> model input name.
OPTION_INPUTS: dict[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "height": "height",
    "width": "width",
    "num_frames": "num_frames",
    "steps": "num_inference_steps",
    "seed": "seed",
    "guidance_scale": "guidance_scale",
    "guidance_scale_2": "guidance_scale_2",
    "fps": "fps",
}

VIDEO_OUTPUT = "video"
FRAMES_OUTPUT = "frames"
USED_SEED_OUTPUT = "used_seed"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID_ARGUMENT = 2
EXIT_BUSY = 3  # the server's queue is full: try again later
EXIT_DEADLINE = 4  # the request's deadline (timeout_s) passed
EXIT_INTERRUPTED = 130

# Health checks should answer in milliseconds; the bound only keeps an unroutable address from hanging the client.
HEALTH_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.5
# The server stops a request at its `timeout_s` deadline and says so; the gRPC deadline comes this much later, so
# that the server's own error (which names the step it stopped at) arrives first.
DEADLINE_GRACE_S = 5.0
# Begins the server's message for a request stopped at its deadline.
SERVER_DEADLINE_MESSAGE = "timeout_s: deadline exceeded"
STREAM_SUFFIX = "_stream"
# A stream error's message starts with its Triton code in brackets: the gRPC stream carries no status code.
STREAM_CODE_EXIT = {"INVALID_ARG": EXIT_INVALID_ARGUMENT, "UNAVAILABLE": EXIT_BUSY}
# The wait before the first retry (--retries), doubled before each next one up to RETRY_BACKOFF_MAX_S.
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 4.0
UNAVAILABLE = "StatusCode.UNAVAILABLE"


@dataclass(frozen=True)
class GenerateResult:
    """What one generation request returned."""

    video: bytes
    frames: np.ndarray | None
    elapsed_s: float
    used_seed: int  # the seed the server drew the noise from (its own random one when the request gave none)


class GenerateError(Exception):
    """A failed request, with a message for the user and the exit code the CLI should return; `retryable` when it
    failed for want of a server (connection failed or broke, UNAVAILABLE), so that sending it again may succeed."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.retryable = retryable


def build_infer_inputs(values: Mapping[str, object], image: bytes | None = None) -> list[grpcclient.InferInput]:
    """Turn {input name: python value} into Triton inputs of shape [1]; None values are left out (server default).

    `image` (or `values["image"]`) is the conditioning image's file content, read by the caller: the server never
    reads a path.
    """
    if image is not None:
        values = {**values, "image": image}
    unknown = sorted(set(values) - set(INPUT_DATATYPES))
    if unknown:
        raise ValueError(f"unknown input(s) {unknown}; the model takes {list(INPUT_DATATYPES)}")
    inputs = []
    for name, datatype in INPUT_DATATYPES.items():
        value = values.get(name)
        if value is None:
            continue
        infer_input = grpcclient.InferInput(name, [1], datatype)
        infer_input.set_data_from_numpy(_to_array(name, datatype, value))
        inputs.append(infer_input)
    return inputs


def _to_array(name: str, datatype: str, value: object) -> np.ndarray:
    if datatype == "BYTES":
        if name == "image" and not isinstance(value, bytes):
            raise TypeError(
                f"image must be the file's bytes (read it here; the server reads no paths), got {type(value).__name__}"
            )
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes):
            raise TypeError(f"{name} must be str or bytes, got {type(value).__name__}")
        return np.array([value], dtype=np.object_)
    # bool is an int subclass, but True is never a meaningful height or seed.
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got bool")
    if datatype == "INT64":
        if not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        if not -(2**63) <= int(value) < 2**63:
            raise ValueError(f"{name} does not fit in int64: {value}")
        return np.array([value], dtype=np.int64)
    if datatype == "FP32":
        if not isinstance(value, int | float | np.integer | np.floating):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        return np.array([value], dtype=np.float32)
    raise AssertionError(f"no conversion for datatype {datatype}")  # INPUT_DATATYPES only holds the ones above


def _request_inputs(inputs: Mapping[str, object], timeout_s: float | None) -> list[grpcclient.InferInput]:
    """The request's Triton inputs; `timeout_s` travels as the input of that name (the server stops at it)."""
    if inputs.get("prompt") is None:
        raise GenerateError("a prompt is required", EXIT_INVALID_ARGUMENT)
    if timeout_s is not None:
        inputs = {**inputs, "timeout_s": timeout_s}
    try:
        return build_infer_inputs(inputs)
    except (TypeError, ValueError) as error:
        raise GenerateError(str(error), EXIT_INVALID_ARGUMENT) from error


def _connect(url: str) -> grpcclient.InferenceServerClient:
    try:
        return grpcclient.InferenceServerClient(url=url)
    except Exception as error:  # tritonclient raises plain Exception for a malformed URL
        raise GenerateError(f"cannot reach Triton at {url}: {error}") from error


def _requested_outputs(want_frames: bool, extra: Sequence[str] = ()) -> list[grpcclient.InferRequestedOutput]:
    names = [VIDEO_OUTPUT, USED_SEED_OUTPUT, *extra] + ([FRAMES_OUTPUT] if want_frames else [])
    return [grpcclient.InferRequestedOutput(name) for name in names]


def _generate_result(result: grpcclient.InferResult, want_frames: bool, elapsed_s: float) -> GenerateResult:
    video = result.as_numpy(VIDEO_OUTPUT)
    if video is None or video.size != 1:
        raise GenerateError(f"the server's response has no single '{VIDEO_OUTPUT}' output")
    frames = result.as_numpy(FRAMES_OUTPUT) if want_frames else None
    if want_frames and frames is None:
        raise GenerateError(f"the server's response has no '{FRAMES_OUTPUT}' output")
    used_seed = result.as_numpy(USED_SEED_OUTPUT)
    if used_seed is None or used_seed.size != 1:
        raise GenerateError(f"the server's response has no single '{USED_SEED_OUTPUT}' output")
    return GenerateResult(
        video=bytes(video.reshape(-1)[0]), frames=frames, elapsed_s=elapsed_s, used_seed=int(used_seed.reshape(-1)[0])
    )


def generate(
    url: str,
    model: str,
    inputs: Mapping[str, object],
    want_frames: bool,
    timeout_s: float | None,
    *,
    progress: Callable[[float], None] | None = None,
    retries: int = 0,
    on_retry: Callable[[int, GenerateError], None] | None = None,
) -> GenerateResult:
    """Run one generation request on Triton and return the MP4 (and the raw frames when asked for).

    `progress` is called with the elapsed seconds about every POLL_INTERVAL_S while waiting. A request that failed
    for want of a server is sent again up to `retries` times (module docstring), `on_retry(attempt, error)` told
    before each. Raises GenerateError.
    """
    return with_retries(
        lambda remaining_s: _generate_once(url, model, inputs, want_frames, remaining_s, progress),
        timeout_s,
        retries,
        on_retry,
    )


def with_retries(
    attempt: Callable[[float | None], GenerateResult],
    timeout_s: float | None,
    retries: int,
    on_retry: Callable[[int, GenerateError], None] | None = None,
) -> GenerateResult:
    """Call `attempt(seconds left of timeout_s)` until it returns, raises a GenerateError that is not retryable,
    has been retried `retries` times, or the next wait would end past the deadline."""
    start = time.monotonic()
    for retry in itertools.count(1):
        remaining_s = timeout_s if timeout_s is None or retry == 1 else timeout_s - (time.monotonic() - start)
        try:
            return attempt(remaining_s)
        except GenerateError as error:
            backoff_s = min(RETRY_BACKOFF_S * 2 ** (retry - 1), RETRY_BACKOFF_MAX_S)
            left_s = None if timeout_s is None else timeout_s - (time.monotonic() - start)
            if not error.retryable or retry > retries or (left_s is not None and left_s <= backoff_s):
                raise
            logger.warning("%s; retry %d of %d in %.1f s", error, retry, retries, backoff_s)
            if on_retry is not None:
                on_retry(retry, error)
            time.sleep(backoff_s)
    raise AssertionError("unreachable")


def _generate_once(
    url: str,
    model: str,
    inputs: Mapping[str, object],
    want_frames: bool,
    timeout_s: float | None,
    progress: Callable[[float], None] | None,
) -> GenerateResult:
    infer_inputs = _request_inputs(inputs, timeout_s)
    client = _connect(url)
    try:
        _check_ready(client, url, model)
        result, elapsed_s = _infer(client, model, infer_inputs, _requested_outputs(want_frames), timeout_s, progress)
    finally:
        client.close()
    return _generate_result(result, want_frames, elapsed_s)


@dataclass(frozen=True)
class StreamUpdate:
    """One progress response of the streaming endpoint."""

    stage: str  # text_encode, denoise, vae_decode, postprocess, done
    step: int
    num_steps: int
    elapsed_s: float  # on the server, since it received the request
    preview: np.ndarray | None  # uint8 [H, W, 3]


def generate_stream(
    url: str,
    model: str,
    inputs: Mapping[str, object],
    want_frames: bool,
    timeout_s: float | None,
    *,
    on_update: Callable[[StreamUpdate], None] | None = None,
    retries: int = 0,
    on_retry: Callable[[int, GenerateError], None] | None = None,
) -> GenerateResult:
    """`generate` through the streaming endpoint `<model>_stream`: `on_update` sees every progress response (step,
    stage, preview frames when `inputs["preview"]` asks for them). Ctrl-C cancels the request on the server.
    `retries` and `on_retry` as for `generate`; a retried request starts over (its progress too)."""
    return with_retries(
        lambda remaining_s: _generate_stream_once(url, model, inputs, want_frames, remaining_s, on_update),
        timeout_s,
        retries,
        on_retry,
    )


def _generate_stream_once(
    url: str,
    model: str,
    inputs: Mapping[str, object],
    want_frames: bool,
    timeout_s: float | None,
    on_update: Callable[[StreamUpdate], None] | None,
) -> GenerateResult:
    infer_inputs = _request_inputs(inputs, timeout_s)
    stream_model = model + STREAM_SUFFIX
    client = _connect(url)
    responses: queue.Queue = queue.Queue()
    start = time.monotonic()
    finished = False
    try:
        _check_ready(client, url, stream_model)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        outputs = _requested_outputs(want_frames, STREAM_PROGRESS_OUTPUTS)
        client.async_stream_infer(stream_model, infer_inputs, outputs=outputs)
        while True:
            try:
                result, error = responses.get(timeout=POLL_INTERVAL_S)
            except queue.Empty:
                if timeout_s is not None and time.monotonic() - start > timeout_s + 2 * DEADLINE_GRACE_S:
                    raise GenerateError(f"request timed out after {timeout_s:g} s", EXIT_DEADLINE) from None
                continue
            if error is not None:
                # The stream model sends an error only as its final response: the request has ended on the server.
                finished = True
                raise stream_error(error)
            update = _stream_update(result)
            if on_update is not None:
                on_update(update)
            if update.stage == "done":
                finished = True
                break
    finally:
        # Leaving while the request still runs (Ctrl-C, our own timeout, a malformed progress response) cancels it:
        # the server stops denoising within one step. A request that has ended is never cancelled: in Triton 2.51,
        # cancelling a stream after a request that streamed several responses has finished leaks that request in the
        # gRPC frontend, and the stream model can then never unload (server shutdown waits out its exit timeout).
        client.stop_stream(cancel_requests=not finished)
        client.close()
    return _generate_result(result, want_frames, time.monotonic() - start)


STREAM_PROGRESS_OUTPUTS = ("stage", "step", "num_steps", "elapsed_s", "preview_frame")


def _stream_update(result: grpcclient.InferResult) -> StreamUpdate:
    def scalar(name: str):
        value = result.as_numpy(name)
        if value is None:
            raise GenerateError(f"a progress response without '{name}'")
        return value.reshape(-1)[0]

    return StreamUpdate(
        stage=bytes(scalar("stage")).decode(),
        step=int(scalar("step")),
        num_steps=int(scalar("num_steps")),
        elapsed_s=float(scalar("elapsed_s")),
        preview=result.as_numpy("preview_frame"),
    )


def stream_error(error: InferenceServerException) -> GenerateError:
    """A stream's error: its message starts with "[CODE] " (the gRPC stream carries no status code)."""
    message = error.message() or str(error)
    match = re.match(r"^\[([A-Z_]+)\] (.*)$", message, re.S)
    code, text = (match.group(1), match.group(2)) if match else ("", message)
    if SERVER_DEADLINE_MESSAGE in text:
        return GenerateError(f"deadline exceeded: {text} (raise --timeout or ask for less)", EXIT_DEADLINE)
    if code == "UNAVAILABLE":
        return GenerateError(f"server busy: {text}; try again later", EXIT_BUSY, retryable=True)
    if not match and error.status() == UNAVAILABLE:
        # Not the model's answer but the transport's: the stream broke (the server or its connection went away).
        return GenerateError(f"lost the stream: {text}", retryable=True)
    if code == "INVALID_ARG":
        return GenerateError(f"request rejected: {text}", EXIT_INVALID_ARGUMENT)
    return GenerateError(f"inference failed ({code or 'no code'}): {text}", STREAM_CODE_EXIT.get(code, EXIT_FAILURE))


def write_ppm(path: Path, frame: np.ndarray) -> None:
    """An uint8 [H, W, 3] RGB frame as a binary PPM (readable by every image viewer and library, no dependency)."""
    height, width = frame.shape[:2]
    path.write_bytes(f"P6 {width} {height} 255\n".encode() + np.ascontiguousarray(frame, dtype=np.uint8).tobytes())


class StepBar:
    """The streaming client's progress bar: stage and denoising step, redrawn in place on a terminal, a line per
    stage change (and every 10 steps) otherwise."""

    WIDTH = 30

    def __init__(self, stream: TextIO, preview_dir: Path | None) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._preview_dir = preview_dir
        self._last: tuple[str, int] | None = None
        self.previews: list[Path] = []

    def __call__(self, update: StreamUpdate) -> None:
        if update.preview is not None and self._preview_dir is not None:
            self._preview_dir.mkdir(parents=True, exist_ok=True)
            path = self._preview_dir / f"preview_step{update.step:03d}.ppm"
            write_ppm(path, update.preview)
            self.previews.append(path)
        total = max(update.num_steps, 1)
        filled = round(self.WIDTH * update.step / total)
        line = (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] step {update.step}/{update.num_steps} "
            f"{update.stage} {update.elapsed_s:.1f} s"
        )
        if self._tty:
            self._stream.write("\r\033[K" + line)
        elif self._last is None or self._last[0] != update.stage or update.step % 10 == 0:
            if (update.stage, update.step) == self._last:
                return
            self._stream.write(line + "\n")
        else:
            return
        self._last = (update.stage, update.step)
        self._stream.flush()

    def finish(self) -> None:
        if self._tty and self._last is not None:
            self._stream.write("\n")
            self._stream.flush()


def _check_ready(client: grpcclient.InferenceServerClient, url: str, model: str) -> None:
    try:
        live = client.is_server_live(client_timeout=HEALTH_TIMEOUT_S)
    except InferenceServerException as error:
        raise GenerateError(
            f"cannot reach Triton at {url}: {error.message()}", retryable=error.status() == UNAVAILABLE
        ) from error
    if not live:
        raise GenerateError(f"Triton at {url} answers but is not live")
    try:
        ready = client.is_model_ready(model, client_timeout=HEALTH_TIMEOUT_S)
    except InferenceServerException as error:
        raise GenerateError(
            f"cannot ask Triton at {url} about model '{model}': {error.message()}",
            retryable=error.status() == UNAVAILABLE,
        ) from error
    if not ready:
        raise GenerateError(
            f"model '{model}' is not ready on Triton at {url} (not loaded, still loading, or failed to load; "
            "see the server log)"
        )


class _Reply:
    """Hands the async_infer callback's outcome (called on a gRPC thread) to the waiting thread."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: grpcclient.InferResult | None = None
        self.error: InferenceServerException | None = None

    def __call__(self, result: grpcclient.InferResult | None, error: InferenceServerException | None) -> None:
        self.result = result
        self.error = error
        self.done.set()


def _infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    infer_inputs: list[grpcclient.InferInput],
    outputs: list[grpcclient.InferRequestedOutput],
    timeout_s: float | None,
    progress: Callable[[float], None] | None,
) -> tuple[grpcclient.InferResult, float]:
    reply = _Reply()
    start = time.monotonic()
    try:
        # async_infer so this thread stays free to show progress; the gRPC deadline (client_timeout) also tells the
        # server to give up on the request.
        deadline = None if timeout_s is None else timeout_s + DEADLINE_GRACE_S
        call = client.async_infer(model, infer_inputs, reply, outputs=outputs, client_timeout=deadline)
    except InferenceServerException as error:
        raise GenerateError(
            f"could not send the request: {error.message()}", retryable=error.status() == UNAVAILABLE
        ) from error
    try:
        while not reply.done.wait(POLL_INTERVAL_S):
            elapsed = time.monotonic() - start
            if timeout_s is not None and elapsed > timeout_s + 2 * DEADLINE_GRACE_S:
                call.cancel()
                raise GenerateError(f"request timed out after {timeout_s:g} s", EXIT_DEADLINE)
            if progress is not None:
                progress(elapsed)
    except KeyboardInterrupt:
        call.cancel()  # don't leave the server generating a video nobody will receive
        raise
    elapsed = time.monotonic() - start

    if reply.error is not None:
        if is_queue_full(reply.error):
            raise busy_error(reply.error, model, queue_size(client, model))
        raise _request_error(reply.error, model, timeout_s)
    if reply.result is None:
        raise GenerateError("the server returned neither a result nor an error")
    return reply.result, elapsed


# What Triton answers (UNAVAILABLE) when a request finds the scheduler's queue full (deployment `serving:`).
QUEUE_FULL_MESSAGE = "Exceeds maximum queue size"


def is_queue_full(error: InferenceServerException) -> bool:
    return error.status() == "StatusCode.UNAVAILABLE" and QUEUE_FULL_MESSAGE in (error.message() or "")


def queue_size(client: grpcclient.InferenceServerClient, model: str) -> int | None:
    """The queue limit of the ensemble's scheduler step (`<model>_scheduler`), or None where it cannot be read."""
    try:
        config = client.get_model_config(f"{model}_scheduler", as_json=True, client_timeout=HEALTH_TIMEOUT_S)
        size = config["config"]["dynamic_batching"]["default_queue_policy"]["max_queue_size"]
    except (InferenceServerException, KeyError, TypeError):
        return None
    return int(size)


def busy_error(error: InferenceServerException, model: str, size: int | None) -> GenerateError:
    limit = f" ({size} requests already waiting)" if size is not None else ""
    return GenerateError(
        f"server busy: the queue of model '{model}' is full{limit}; try again later [{error.message()}]",
        EXIT_BUSY,
        retryable=True,
    )


def _request_error(error: InferenceServerException, model: str, timeout_s: float | None) -> GenerateError:
    status = error.status() or ""
    message = error.message() or str(error)
    if status == "StatusCode.INVALID_ARGUMENT":
        return GenerateError(f"request rejected: {message}", EXIT_INVALID_ARGUMENT)
    if SERVER_DEADLINE_MESSAGE in message:
        return GenerateError(f"deadline exceeded: {message} (raise --timeout or ask for less)", EXIT_DEADLINE)
    if status == "StatusCode.DEADLINE_EXCEEDED":
        limit = f" after {timeout_s:g} s" if timeout_s is not None else ""
        return GenerateError(f"request timed out{limit} (raise --timeout or ask for less)", EXIT_DEADLINE)
    if status == UNAVAILABLE:
        return GenerateError(
            f"lost the connection to Triton while model '{model}' was working: {message}", retryable=True
        )
    if status == "StatusCode.CANCELLED":
        return GenerateError(f"request cancelled: {message}")
    return GenerateError(f"inference failed ({status or 'no status'}): {message}")


class Progress:
    """Shows elapsed time on a stream: a spinner updated in place on a terminal, a line every 10 s otherwise."""

    LINE_EVERY_S = 10.0

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        self._tty = stream.isatty()
        self._spinner = itertools.cycle("|/-\\")
        self._next_line_at = self.LINE_EVERY_S
        self._drawn = False

    def __call__(self, elapsed_s: float) -> None:
        if self._tty:
            self._stream.write(f"\r{next(self._spinner)} {self._label} {elapsed_s:6.1f} s")
            self._drawn = True
        elif elapsed_s >= self._next_line_at:
            self._stream.write(f"{self._label} {elapsed_s:.0f} s\n")
            self._next_line_at += self.LINE_EVERY_S
        else:
            return
        self._stream.flush()

    def finish(self) -> None:
        """Clear the spinner line so later messages start on a clean line."""
        if self._drawn:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._drawn = False


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        # `python -m wan_client` would otherwise show itself as `__main__.py`.
        prog="python -m wan_client" if Path(sys.argv[0]).name == "__main__.py" else None,
        description="Generate a video with the Wan2.2 text-to-video model served by Triton (gRPC).",
        epilog="Options left out are not sent; the server applies its defaults and limits.",
    )
    parser.add_argument("--prompt", required=True, help="text describing the video")
    parser.add_argument("--negative-prompt", help="text describing what to avoid")
    parser.add_argument("--height", type=int, help="frame height in pixels")
    parser.add_argument("--width", type=int, help="frame width in pixels")
    parser.add_argument("--num-frames", type=int, help="number of frames")
    parser.add_argument("--steps", type=int, help="number of denoising steps (num_inference_steps)")
    parser.add_argument("--seed", type=int, help="random seed, for reproducible output")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (high-noise stage)")
    parser.add_argument("--guidance-scale-2", type=float, help="classifier-free guidance scale (low-noise stage)")
    parser.add_argument("--fps", type=int, help="frame rate written into the MP4")
    parser.add_argument(
        "--image", type=Path, help="image-to-video: a PNG, JPEG or WebP file, read here and sent as its bytes"
    )
    parser.add_argument(
        "--output", type=Path, default=Path(DEFAULT_OUTPUT), help=f"MP4 path (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument("--frames-npy", type=Path, help="also fetch the raw uint8 frames [F, H, W, 3] and np.save them")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds (default: wait indefinitely)")
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        help="send again up to N times when no server could answer (connection lost, UNAVAILABLE); default 0",
    )
    parser.add_argument(
        "--stream", action="store_true", help="use the streaming endpoint: step progress bar, previews, Ctrl-C cancels"
    )
    parser.add_argument("--preview-every", type=int, help="with --stream: a preview frame every K denoising steps")
    parser.add_argument("--preview-dir", type=Path, help="with --stream: save preview frames here (PPM)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log request details")
    args = parser.parse_args(argv)
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    if (args.preview_every is not None or args.preview_dir is not None) and not args.stream:
        parser.error("--preview-every and --preview-dir need --stream")
    return args


def inputs_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Map parsed options to model inputs, keeping only the ones the user gave."""
    values = {input_name: getattr(args, option) for option, input_name in OPTION_INPUTS.items()}
    if getattr(args, "stream", False):
        values["preview"] = args.preview_every
    if getattr(args, "image", None) is not None:
        values["image"] = read_image_file(args.image)
    return {name: value for name, value in values.items() if value is not None}


def read_image_file(path: Path) -> bytes:
    """The content of the `--image` file; the server checks that it is an image it takes."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise GenerateError(f"cannot read --image {path}: {error}", EXIT_INVALID_ARGUMENT) from error


def describe_mp4(data: bytes) -> str | None:
    """A one-line summary (frames, size, fps) of an MP4, or None when PyAV is not installed or cannot parse it."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            rate = stream.average_rate
            fps = f", {float(rate):g} fps" if rate else ""
            return f"{stream.frames} frames, {stream.codec_context.width}x{stream.codec_context.height}{fps}"
    except (av.error.FFmpegError, IndexError) as error:
        logger.debug("cannot parse the returned MP4: %s", error)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    try:
        inputs = inputs_from_args(args)
    except GenerateError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    shown = {k: f"<{len(v)} bytes>" if k == "image" else v for k, v in inputs.items()}
    logger.debug("sending to %s model %s: %s", args.url, args.model, shown)

    progress: Progress | StepBar
    try:
        if args.stream:
            progress = StepBar(sys.stderr, args.preview_dir)
            result = generate_stream(
                args.url,
                args.model,
                inputs,
                want_frames=args.frames_npy is not None,
                timeout_s=args.timeout,
                on_update=progress,
                retries=args.retries,
            )
        else:
            progress = Progress(sys.stderr, f"generating on {args.url} ({args.model})...")
            result = generate(
                args.url,
                args.model,
                inputs,
                want_frames=args.frames_npy is not None,
                timeout_s=args.timeout,
                progress=progress,
                retries=args.retries,
            )
    except GenerateError as error:
        progress.finish()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        progress.finish()
        print("interrupted; request cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.finish()

    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(result.video)
        if args.frames_npy is not None and result.frames is not None:
            args.frames_npy.parent.mkdir(parents=True, exist_ok=True)
            np.save(args.frames_npy, result.frames)
    except OSError as error:
        print(f"error: cannot write output: {error}", file=sys.stderr)
        return EXIT_FAILURE

    # The seed is printed even when the request set it: with it, the same request reproduces the video.
    summary = f"received {len(result.video) / 1e6:.2f} MB MP4 in {result.elapsed_s:.1f} s, seed {result.used_seed}"
    details = describe_mp4(result.video)
    if details:
        summary += f" ({details})"
    if result.frames is not None:
        summary += f"; frames {result.frames.dtype}{list(result.frames.shape)} saved to {args.frames_npy}"
    print(summary, file=sys.stderr)
    print(args.output)
    return EXIT_OK
