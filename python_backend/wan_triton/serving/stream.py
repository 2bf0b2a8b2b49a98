"""The streaming endpoint `<model_name>_stream`: the five steps through BLS, with progress, previews, cancellation and
deadlines.

Triton 2.51 refuses unary calls to an ensemble with a decoupled step, so `wan_t2v` stays a plain ensemble and this
decoupled model sits beside it, calling the same step models (and so sharing the scheduler's queue and batches).
Each request gets a thread: `execute` returns at once and the thread answers through the request's response sender,
first with progress responses (`stage`, `step`, `num_steps`, `elapsed_s`, and `preview_frame` when due), then with
the final response (the same outputs plus `video`, `used_seed` and `frames` when asked for).

While the scheduler denoises, the thread watches the client's request: once it is cancelled (the client cancelled
the stream or went away), it raises the request's cancel flag on the `JobBoard`, which the scheduler reads after its
next step, and answers CANCELLED at once. The scheduler's progress and preview latents come back over the same
board; a preview is the clean-latent estimate's first latent frame decoded by the deployment's own VAE (the
vae_decoder model: one latent frame is one video frame), shrunk to at most `PREVIEW_MAX_SIDE` pixels.

Errors go out as the final response with the code's name in front of the message ("[CANCELLED] ...") because a gRPC
stream carries an error's message but no status code.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from wan_triton.config.deployment import Deployment
from wan_triton.config.request import GenerationRequest, InvalidRequestError
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.serving import model_io as io
from wan_triton.serving.metrics import StageMetrics
from wan_triton.serving.request_input import request_image, validate_for
from wan_triton.serving.stopping import DEADLINE_MESSAGE, JobBoard, RequestStopped, StepGuard
from wan_triton.serving.triton import StageError, bls_infer, error_response, host_numpy, outcome_of, output, pb_utils

logger = logging.getLogger(__name__)

# How often a request's thread looks at the client's request and the scheduler's progress: well under one step.
POLL_S = 0.05
# The longer side of a preview frame, in pixels.
PREVIEW_MAX_SIDE = 256
# How long `close` waits for requests still running when the model unloads (each stops at its next check, answered
# CANCELLED): well inside Triton's own exit timeout (30 s). The threads are daemons, so any still running after that
# are left to the process's end, and named in the log with the stage they are in.
CLOSE_WAIT_S = 5.0


def preview_every(value: np.ndarray | None, max_steps: int) -> int:
    """The request's `preview` input: 0 (no previews, the default) or k (a preview frame every k steps)."""
    if value is None:
        return 0
    arr = np.asarray(value)
    if arr.size != 1:
        raise InvalidRequestError("preview", f"must hold exactly one value, got shape {list(arr.shape)}")
    k = arr.reshape(-1)[0]
    if not isinstance(k, int | np.integer) or isinstance(k, bool | np.bool_) or not 0 <= int(k) <= max_steps:
        raise InvalidRequestError(
            "preview", f"must be an integer in [0, {max_steps}] (0: none; k: a preview frame every k steps); got {k}"
        )
    return int(k)


def shrink_frame(frame: np.ndarray, max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray:
    """uint8 [H, W, 3] scaled down (area average) so that its longer side is at most `max_side`.

    The same numbers as torch's `F.interpolate(mode="area")` (adaptive average pooling), without torch: each output
    pixel averages the input rectangle [floor(i * H / h), ceil((i + 1) * H / h)) x (the same for the width), summed
    exactly and divided in float32 by its height, then by its width, as torch's CPU kernel divides."""
    height, width = frame.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return frame
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    (row_start, row_end), (col_start, col_end) = _pool_bounds(height, size[0]), _pool_bounds(width, size[1])
    # Sums over any rectangle from one table of cumulative sums (exact in int64).
    table = np.zeros((height + 1, width + 1, frame.shape[2]), dtype=np.int64)
    table[1:, 1:] = frame.astype(np.int64).cumsum(0).cumsum(1)
    sums = (
        table[row_end][:, col_end]
        - table[row_start][:, col_end]
        - table[row_end][:, col_start]
        + table[row_start][:, col_start]
    )
    rows = (row_end - row_start).astype(np.float32)[:, None, None]
    cols = (col_end - col_start).astype(np.float32)[None, :, None]
    small = sums.astype(np.float32) / rows / cols
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def _pool_bounds(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Start (inclusive) and end (exclusive) of each output index's input range in adaptive average pooling."""
    index = np.arange(size_out)
    return (index * size_in) // size_out, -((-(index + 1) * size_in) // size_out)


@dataclass
class _Job:
    sender: object
    inputs: dict[str, np.ndarray]
    frames_requested: bool
    token: str
    received: float = field(default_factory=time.monotonic)


class StreamRunner:
    """The stream model's work: one thread per request (see the module docstring)."""

    def __init__(self, deployment: Deployment, checkpoint: Checkpoint, metrics: StageMetrics, model: str) -> None:
        self.deployment = deployment
        self.checkpoint = checkpoint
        self.metrics = metrics
        self.model = model
        self.board = JobBoard()
        self._threads: set[threading.Thread] = set()
        self._stages: dict[str, str] = {}  # thread name -> the stage its request is in (for `close`)
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def submit(self, request) -> None:
        """Take one request (in Triton's execute thread, where its inputs are read) and answer it from a thread."""
        pb = pb_utils()
        inputs = {}
        for tensor in STREAM_INPUTS:
            got = pb.get_input_tensor_by_name(request, tensor.name)
            if got is not None:
                inputs[tensor.name] = np.array(got.as_numpy(), copy=True)
        job = _Job(
            sender=request.get_response_sender(),
            inputs=inputs,
            frames_requested=io.FRAMES.name in request.requested_output_names(),
            token=self.board.new_token(),
        )
        thread = threading.Thread(target=self._run, args=(job,), name=f"wan-stream-{job.token[:8]}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def close(self) -> None:
        """Stop every running request (CANCELLED) and wait for their threads, so the model unloads promptly."""
        self._closing.set()
        deadline = time.monotonic() + CLOSE_WAIT_S
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = {t.name: self._stages.get(t.name, "?") for t in self._threads if t.is_alive()}
        if stuck:
            logger.warning("%s unloading with requests still running (thread: stage): %s", self.model, stuck)

    def _run(self, job: _Job) -> None:
        self._stages[threading.current_thread().name] = "preprocess"
        failure = None
        try:
            final = self._generate(job)
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
            final = error_response(exc, self.model, tag_code=True)
            failure = exc
        # The last use of the request: Triton frees it after the final response, and asking a freed request whether
        # it was cancelled crashes the server, so nothing touches `job.sender` after this.
        self._stages[threading.current_thread().name] = "sending the final response"
        self._send(job, final, final=True)
        self.metrics.request_done(time.monotonic() - job.received, outcome_of(failure))
        with self._lock:
            self._threads.discard(threading.current_thread())
            self._stages.pop(threading.current_thread().name, None)

    def _send(self, job: _Job, response, final: bool = False) -> None:
        pb = pb_utils()
        try:
            job.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
        except Exception as exc:  # noqa: BLE001 - a closed stream must not kill the thread
            logger.info("%s: could not send to request %s: %s", self.model, job.token[:8], exc)

    def _progress(self, job: _Job, stage: str, step: int, num_steps: int, preview: np.ndarray | None = None) -> list:
        tensors = [
            output(io.STAGE.name, np.array([stage.encode()], dtype=object)),
            output(io.STEP.name, np.array([step], dtype=np.int64)),
            output(io.NUM_STEPS.name, np.array([num_steps], dtype=np.int64)),
            output(io.ELAPSED_S.name, np.array([time.monotonic() - job.received], dtype=np.float32)),
        ]
        if preview is not None:
            tensors.append(output(io.PREVIEW_FRAME.name, preview))
        return tensors

    def _report(self, job: _Job, stage: str, step: int, num_steps: int, preview: np.ndarray | None = None) -> None:
        self._stages[threading.current_thread().name] = stage
        tensors = self._progress(job, stage, step, num_steps, preview)
        self._send(job, pb_utils().InferenceResponse(output_tensors=tensors))

    def _stopped(self, job: _Job) -> bool:
        """Whether the client cancelled (or left) or the model is unloading. Only called before the final response."""
        return self._closing.is_set() or job.sender.is_cancelled()

    def _generate(self, job: _Job):
        name = self.deployment.model_name
        every = preview_every(job.inputs.get(io.PREVIEW.name), self.deployment.limits.max_num_inference_steps)
        request_inputs = {t.name: job.inputs[t.name] for t in io.REQUEST_INPUTS if t.name in job.inputs}
        # Checked here first so that bad input is answered with its own code (a BLS caller sees every error of a
        # called model as INTERNAL); preprocess checks the same again.
        checked = validate_for(
            {t.name: job.inputs.get(t.name) for t in io.REQUEST_INPUTS}, self.deployment, self.checkpoint
        )
        request_image(checked, self.deployment)
        # Intermediate tensors go from one BLS response into the next request as Tensors (`keep`): a GPU step's
        # output stays on its GPU (DLPack); only what this model reads itself comes to the host.
        pre = bls_infer(
            f"{name}_preprocess",
            request_inputs,
            [t.name for t in io.PREPROCESS.outputs],
            keep=(io.INPUT_IDS.name, io.ATTENTION_MASK.name, io.CONDITION_IMAGE.name),
        )
        request_json = pre[io.REQUEST_JSON.name]
        req = GenerationRequest(**json.loads(bytes(request_json.reshape(-1)[0]).decode("utf-8")))
        n = req.num_inference_steps
        guard = StepGuard(req.timeout_s, req.deadline_unix_s, [lambda: self._stopped(job)])

        self._report(job, "text_encode", 0, n)
        text = bls_infer(
            f"{name}_text_encoder",
            {io.INPUT_IDS.name: pre[io.INPUT_IDS.name], io.ATTENTION_MASK.name: pre[io.ATTENTION_MASK.name]},
            [io.PROMPT_EMBEDS.name],
            keep=(io.PROMPT_EMBEDS.name,),
        )
        guard.check("before denoising")
        self._report(job, "denoise", 0, n)
        latents = self._denoise(
            job, request_json.reshape(1, 1), text[io.PROMPT_EMBEDS.name], pre[io.CONDITION_IMAGE.name], n, every
        )

        guard.check("before the VAE decode")
        self._report(job, "vae_decode", n, n)
        decoded = bls_infer(
            f"{name}_vae_decoder",
            {io.LATENTS.name: latents, io.REQUEST_JSON.name: request_json},
            [io.DECODED_FRAMES.name, io.DECODED_VIDEO.name],
            keep=(io.DECODED_FRAMES.name, io.DECODED_VIDEO.name),
        )
        guard.check("before postprocessing")
        self._report(job, "postprocess", n, n)
        # As the ensemble wires it (model_io.ensemble_steps): where the vae_decoder step encoded the MP4, postprocess
        # hands on the MP4 alone and the frames come from the decoder.
        encoded = self.deployment.video.encode_while_decoding
        post_inputs = {io.REQUEST_JSON.name: request_json, io.DECODED_VIDEO.name: decoded[io.DECODED_VIDEO.name]}
        if not encoded:
            post_inputs[io.DECODED_FRAMES.name] = decoded[io.DECODED_FRAMES.name]
        wanted = [io.VIDEO.name] + ([io.FRAMES.name] if job.frames_requested and not encoded else [])
        post = bls_infer(f"{name}_postprocess", post_inputs, wanted)
        logger.info("%s: request %s done in %.2f s", self.model, job.token[:8], time.monotonic() - job.received)
        tensors = self._progress(job, "done", n, n)
        tensors.append(output(io.VIDEO.name, post[io.VIDEO.name]))
        tensors.append(output(io.USED_SEED.name, np.array([req.seed], dtype=np.int64)))
        if job.frames_requested:
            frames = host_numpy(decoded[io.DECODED_FRAMES.name]) if encoded else post[io.FRAMES.name]
            tensors.append(output(io.FRAMES.name, frames))
        return pb_utils().InferenceResponse(output_tensors=tensors)

    def _denoise(self, job: _Job, request_json: np.ndarray, prompt_embeds, condition_image, num_steps: int, every: int):
        """The scheduler call, in a helper thread, while this thread relays progress and previews and watches for
        cancellation. A cancelled request is answered at once; its flag stays up until the scheduler call ends (the
        scheduler stops after its current step), and the helper clears the request's board files then."""
        name = self.deployment.model_name
        result: dict = {}
        done = threading.Event()
        abandoned = threading.Event()  # the request was answered (cancelled) before the call ended

        def call() -> None:
            try:
                got = bls_infer(
                    f"{name}_scheduler",
                    {
                        io.REQUEST_JSON.name: request_json,
                        io.PROMPT_EMBEDS.name: prompt_embeds,
                        io.CONDITION_IMAGE.name: condition_image,
                        io.JOB_TOKEN.name: np.array([[job.token.encode()]], dtype=object),
                        io.PREVIEW_EVERY.name: np.array([[every]], dtype=np.int64),
                    },
                    [io.LATENTS.name],
                    keep=(io.LATENTS.name,),
                )
                result["latents"] = got[io.LATENTS.name]
            except Exception as exc:  # noqa: BLE001 - handed to the request's thread
                result["error"] = exc
            finally:
                done.set()
                if abandoned.is_set():
                    self.board.clear(job.token)

        threading.Thread(target=call, name=f"wan-scheduler-{job.token[:8]}", daemon=True).start()
        reported = 0
        while True:
            finished = done.wait(POLL_S)
            if not finished and self._stopped(job):
                abandoned.set()
                self.board.cancel(job.token)
                if done.is_set():  # the call ended meanwhile, before it could see `abandoned`
                    self.board.clear(job.token)
                why = "the model is unloading" if self._closing.is_set() else "the client cancelled it"
                raise RequestStopped("cancelled", f"request cancelled during denoising ({why}) after step {reported}")
            # Relayed once more after the call ended, so the last preview and step are not lost.
            preview = self.board.take_preview(job.token)
            if preview is not None:
                step, clean_latents = preview
                self._report(job, "denoise", step, num_steps, self._decode_preview(clean_latents))
                reported = max(reported, step)
            progress = self.board.progress(job.token)
            if progress is not None and progress.step > reported:
                reported = progress.step
                self._report(job, "denoise", reported, num_steps)
            if finished:
                break
        self.board.clear(job.token)
        if "error" in result:
            exc = result["error"]
            if isinstance(exc, StageError) and DEADLINE_MESSAGE in str(exc):
                raise RequestStopped("deadline", str(exc)[str(exc).index(DEADLINE_MESSAGE) :]) from None
            raise exc
        return result["latents"]

    def _decode_preview(self, clean_latents: np.ndarray) -> np.ndarray:
        decoded = bls_infer(
            f"{self.deployment.model_name}_vae_decoder",
            {io.LATENTS.name: np.ascontiguousarray(clean_latents, dtype=np.float32)},
            [io.DECODED_FRAMES.name],
        )
        return shrink_frame(decoded[io.DECODED_FRAMES.name][0])


STREAM_INPUTS = io.STREAM.inputs

__all__ = ["StreamRunner", "preview_every", "shrink_frame"]
