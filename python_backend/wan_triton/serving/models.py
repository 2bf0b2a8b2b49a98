"""The Python-backend model classes of the `wan_t2v` ensemble; each model.py re-exports one as TritonPythonModel.

preprocess -> text_encoder -> scheduler (the denoising loop, owning both experts in its own process) ->
vae_decoder -> postprocess. See `model_io` for the tensors between them.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from wan_triton.components import build_denoiser, build_text_encoder, build_vae_decoder, warm_up_denoiser
from wan_triton.config.request import GUIDANCE_THRESHOLD, GenerationRequest, request_json
from wan_triton.model.denoise import BatchItem, group_by_shape, latent_shape
from wan_triton.model.text import PromptTokenizer, encode_tokens
from wan_triton.model.video import encode_mp4
from wan_triton.pipeline import prompts_for
from wan_triton.serving import model_io as io
from wan_triton.serving.metrics import StageMetrics
from wan_triton.serving.request_input import request_image, validate_for
from wan_triton.serving.stopping import JobBoard, StepGuard
from wan_triton.serving.stream import StreamRunner
from wan_triton.serving.triton import (
    ModelContext,
    error_response,
    execute_each,
    outcome_of,
    output,
    output_torch,
    pb_utils,
    read_inputs,
    read_request_json,
    read_torch,
)

logger = logging.getLogger("wan_triton.serving")


def _configure_logging() -> None:
    # Triton captures the stub's stderr into its own log.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class _Model:
    role: str

    def initialize(self, args: dict) -> None:
        _configure_logging()
        self.ctx = ModelContext.from_args(args)
        self.metrics = StageMetrics(pb_utils(), self.ctx.deployment.model_name, self.role)
        started = time.perf_counter()
        self.load()
        self._release_cached_device_memory()
        self.metrics.loaded(True)
        logger.info("%s loaded in %.2f s", self.ctx.name, time.perf_counter() - started)

    def _record_device_memory(self) -> None:
        """Report the step's peak device memory, then hand its cached blocks back to the driver.

        Every step is its own process with its own caching allocator on the same GPU: blocks one process keeps
        cached after a request (the VAE step after a 720p decode held several times its own peak) are memory the
        others cannot get, and the scheduler then runs out at load or at its next 720p step.
        """
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.metrics.device_memory_peak(torch.cuda.max_memory_allocated(self.ctx.device_id))
            torch.cuda.reset_peak_memory_stats(self.ctx.device_id)
            self._release_cached_device_memory()

    def _release_cached_device_memory(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _record_worker_restarts(self, component) -> None:
        """Count restarts of the step's worker group; a component that runs in this process has none."""
        restarts = getattr(component, "restarts", None)
        if restarts is not None:
            self.metrics.worker_group_restarts(restarts)

    def load(self) -> None:
        """Load weights/engines; called once per model instance."""

    def handle(self, request):
        raise NotImplementedError

    def execute(self, requests):
        responses = execute_each(requests, self.ctx.name, self.handle, self.metrics)
        self._record_device_memory()
        return responses

    def finalize(self) -> None:
        self.metrics.loaded(False)
        self.metrics.close()  # before the stub tears down its shared memory (wan_triton.serving.metrics)
        logger.info("%s unloaded", self.ctx.name)


class Preprocess(_Model):
    """Validate the request, fill defaults, tokenize the prompt (and negative prompt when guidance is on)."""

    role = "preprocess"

    def load(self) -> None:
        self.tokenizer = PromptTokenizer(self.ctx.checkpoint.load_tokenizer())

    def handle(self, request):
        inputs = read_inputs(request, [t.name for t in io.REQUEST_INPUTS])
        req = validate_for(inputs, self.ctx.deployment, self.ctx.checkpoint)
        pixels = request_image(req, self.ctx.deployment)
        tokens = self.tokenizer(prompts_for(req))
        return _response(
            output(io.REQUEST_JSON.name, np.array([[request_json(req)]], dtype=object)),
            output(io.INPUT_IDS.name, tokens.input_ids),
            output(io.ATTENTION_MASK.name, tokens.attention_mask),
            output(io.USED_SEED.name, np.array([req.seed], dtype=np.int64)),
            output(io.CONDITION_IMAGE.name, pixels[None]),
        )


class TextEncoder(_Model):
    role = "text_encoder"

    def load(self) -> None:
        cfg = self.ctx.deployment.components.text_encoder
        self.engine = build_text_encoder(self.ctx.checkpoint, cfg, self.ctx.artifacts, self.ctx.device_id)

    def handle(self, request):
        inputs = read_inputs(request, [io.INPUT_IDS.name, io.ATTENTION_MASK.name])
        ids = torch.from_numpy(inputs[io.INPUT_IDS.name])
        embeds = encode_tokens(self.engine, ids, torch.from_numpy(inputs[io.ATTENTION_MASK.name]))
        # [1, rows, ...]: the leading 1 is the scheduler's batch dim (see model_io).
        return _response(output_torch(io.PROMPT_EMBEDS.name, embeds[None]))


class Scheduler(_Model):
    """Runs the whole denoising loop in this process: no Triton round trip per step.

    After every step each request is checked: past its `timeout_s` deadline, or cancelled by the stream model (its
    `job_token` flag on the JobBoard), it stops there with CANCELLED and its latents are freed, while the rest of its
    batch goes on. For the stream model it also leaves its progress and preview latents on the JobBoard."""

    role = "scheduler"

    def load(self) -> None:
        self.board = JobBoard()
        self.metrics.queue_limit_is(self.ctx.deployment.serving.max_queue_size)
        components = self.ctx.deployment.components
        # Condition images are VAE-encoded here, in the scheduler's process, so the ensemble keeps its five steps.
        self.denoiser = build_denoiser(
            self.ctx.checkpoint, components.denoiser, self.ctx.artifacts, self.ctx.device_id, components.vae_encoder
        )
        # Warm up what the default request runs: guided (a batch of 2) or, at guidance_scale <= 1, a batch of 1.
        guided = self.ctx.deployment.defaults.guidance_scale > GUIDANCE_THRESHOLD
        for shape in self.ctx.deployment.warmup:
            started = time.perf_counter()
            warm_up_denoiser(self.denoiser, shape.height, shape.width, shape.num_frames, guided)
            logger.info("%s warm-up %s: %.2f s", self.ctx.name, shape, time.perf_counter() - started)

    def execute(self, requests):
        """Triton's dynamic batcher hands over up to `serving.max_batch_size` queued requests; those of one shape
        are denoised as one batch, other shapes as separate groups. Every request gets its own response."""
        started = time.perf_counter()
        responses: list = [None] * len(requests)
        items: dict[int, BatchItem] = {}
        for n, request in enumerate(requests):
            try:
                items[n] = self._read(request)
            except Exception as exc:  # noqa: BLE001 - that request's error response; the others go on
                responses[n] = self._fail(exc, started)
        indices = list(items)
        groups = group_by_shape([items[n].request for n in indices], self.ctx.deployment.serving.max_batch_size)
        if len(requests) > 1:
            refused = len(requests) - len(indices)  # their deadline had passed, or they could not be read
            logger.info(
                "%s: %d requests handed over together, run as %d batches%s",
                self.ctx.name,
                len(requests),
                len(groups),
                f"; {refused} answered with an error before denoising" if refused else "",
            )
        for group in groups:
            members = [indices[g] for g in group]
            for n, result in zip(members, self._denoise([items[n] for n in members]), strict=True):
                if isinstance(result, BaseException):
                    responses[n] = self._fail(result, started)
                else:
                    responses[n] = _response(output_torch(io.LATENTS.name, result.float()))
                    self.metrics.request_done(time.perf_counter() - started, "success")
        self._record_device_memory()
        self._record_worker_restarts(self.denoiser)
        return responses

    def _read(self, request) -> BatchItem:
        req = GenerationRequest(**read_request_json(request, io.REQUEST_JSON))
        embeds = read_torch(request, io.PROMPT_EMBEDS)
        if embeds.ndim != 4 or embeds.shape[0] != 1:
            raise ValueError(f"internal tensor {io.PROMPT_EMBEDS.name!r}: expected [1, rows, len, dim]")
        extra = read_inputs(request, [io.JOB_TOKEN.name, io.PREVIEW_EVERY.name])
        token = None
        if extra[io.JOB_TOKEN.name] is not None:
            token = self.board.check_token(bytes(extra[io.JOB_TOKEN.name].reshape(-1)[0]).decode("ascii", "replace"))
        every = 0 if extra[io.PREVIEW_EVERY.name] is None else int(extra[io.PREVIEW_EVERY.name].reshape(-1)[0])
        image = read_inputs(request, [io.CONDITION_IMAGE.name])[io.CONDITION_IMAGE.name]
        if image is None or image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"internal tensor {io.CONDITION_IMAGE.name!r}: expected [1, height, width, 3]")
        condition = image[0] if image.size else None
        if req.has_image != (condition is not None) or (
            condition is not None and condition.shape[:2] != (req.height, req.width)
        ):
            raise ValueError(
                f"internal tensor {io.CONDITION_IMAGE.name!r} of shape {list(image.shape)} does not match the request "
                f"({req.width}x{req.height}, {'with' if req.has_image else 'without'} an image)"
            )
        guard = StepGuard(req.timeout_s, req.deadline_unix_s, [] if token is None else [self._cancel_flag(token)])
        guard.check("before denoising (while queued)")
        on_step, on_estimate = self._hooks(guard, token, every)
        # Estimates of the other steps are neither computed nor, from a worker group, sent.
        return BatchItem(req, embeds[0], on_step, on_estimate, estimate_every=max(every, 1), condition_image=condition)

    def _cancel_flag(self, token: str):
        return lambda: self.board.is_cancelled(token)

    def _hooks(self, guard: StepGuard, token: str | None, preview_every: int):
        def on_step(index: int, num_steps: int) -> None:
            self.metrics.step_done()
            if token is not None:
                self.board.set_progress(token, index + 1, num_steps)
            guard.check(f"after step {index + 1} of {num_steps}")

        if token is None or preview_every <= 0:
            # No preview wanted: the loop skips the estimate (and a worker group does not send it).
            return on_step, None

        def on_estimate(index: int, clean_latents: torch.Tensor) -> None:
            if (index + 1) % preview_every == 0:  # the loop calls it only then (BatchItem.estimate_every)
                # The first latent frame only: the stream model decodes it to one small frame.
                self.board.set_preview(token, index + 1, clean_latents[:, :, :1].float().cpu().numpy())

        return on_step, on_estimate

    def _denoise(self, items: list[BatchItem]) -> list:
        """Latents or the exception, per item. A batch that fails as a whole is retried one request at a time,
        so a request that breaks the batched forward fails alone."""
        first = items[0].request
        started = time.perf_counter()
        try:
            results = self.denoiser.run_batch(items)
        except Exception as exc:  # noqa: BLE001 - becomes the requests' error responses
            if len(items) == 1:
                return [exc]
            logger.exception("%s: a batch of %d failed; running its requests one by one", self.ctx.name, len(items))
            return [self._single(item) for item in items]
        seconds = time.perf_counter() - started
        self.metrics.batched(len(items))
        self.metrics.denoised(first.num_inference_steps, seconds)  # each request's rate
        logger.info(
            "denoised a batch of %d: %dx%d x %d frames, %d steps in %.2f s",
            len(items),
            first.width,
            first.height,
            first.num_frames,
            first.num_inference_steps,
            seconds,
        )
        return results

    def _single(self, item: BatchItem):
        try:
            (result,) = self.denoiser.run_batch([item])
        except Exception as exc:  # noqa: BLE001
            return exc
        self.metrics.batched(1)
        return result

    def _fail(self, exc: BaseException, started: float):
        self.metrics.request_done(time.perf_counter() - started, outcome_of(exc))
        return error_response(exc, self.ctx.name)

    def finalize(self) -> None:
        _stop_workers(self.denoiser)
        super().finalize()


class VaeDecoder(_Model):
    role = "vae_decoder"

    def load(self) -> None:
        cfg = self.ctx.deployment.components.vae_decoder
        self.decoder = build_vae_decoder(self.ctx.checkpoint, cfg, self.ctx.artifacts, self.ctx.device_id)
        for shape in self.ctx.deployment.warmup:
            started = time.perf_counter()
            dims = latent_shape(self.ctx.checkpoint, shape.height, shape.width, shape.num_frames)
            self.decoder.frames(torch.zeros(dims))
            logger.info("%s warm-up %s: %.2f s", self.ctx.name, shape, time.perf_counter() - started)

    def handle(self, request):
        latents = read_torch(request, io.LATENTS)
        return _response(output(io.DECODED_FRAMES.name, self.decoder.frames(latents)))

    def execute(self, requests):
        responses = super().execute(requests)
        self._record_worker_restarts(self.decoder)
        return responses

    def finalize(self) -> None:
        _stop_workers(self.decoder)
        super().finalize()


class Postprocess(_Model):
    """The H.264 MP4 of the decoded frames, and the frames themselves."""

    role = "postprocess"

    def handle(self, request):
        req = GenerationRequest(**read_request_json(request, io.REQUEST_JSON))
        frames = read_inputs(request, [io.DECODED_FRAMES.name])[io.DECODED_FRAMES.name]
        video = self.ctx.deployment.video
        mp4 = encode_mp4(frames, req.fps, video.x264_preset, video.x264_crf)
        return _response(output(io.VIDEO.name, np.array([mp4], dtype=object)), output(io.FRAMES.name, frames))


class Stream(_Model):
    """The streaming endpoint `<model_name>_stream` (decoupled): see `stream.StreamRunner`."""

    role = "stream"

    def load(self) -> None:
        self.runner = StreamRunner(self.ctx.deployment, self.ctx.checkpoint, self.metrics, self.ctx.name)

    def execute(self, requests):
        for request in requests:
            self.runner.submit(request)
        return None  # decoupled: every request is answered from its own thread

    def finalize(self) -> None:
        self.runner.close()
        super().finalize()


def _stop_workers(component) -> None:
    """Stop the processes of a worker group (a parallel plan's denoiser, a split decode); a component that runs in
    this process has none."""
    close = getattr(component, "close", None)
    if close is not None:
        close()


def _response(*tensors):
    return pb_utils().InferenceResponse(output_tensors=list(tensors))
