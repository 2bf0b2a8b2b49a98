"""The scheduler step: the whole denoising loop of a batch of requests, in this process."""

from __future__ import annotations

import logging
import time

import torch

from wan_triton.components import build_denoiser, warm_up_denoiser
from wan_triton.config.request import GUIDANCE_THRESHOLD, GenerationRequest
from wan_triton.model.denoise import BatchItem, group_by_shape
from wan_triton.serving import model_io as io
from wan_triton.serving.models.base import response
from wan_triton.serving.models.device import DeviceModel, stop_workers
from wan_triton.serving.stopping import JobBoard, StepGuard
from wan_triton.serving.torch_io import output_torch, read_torch
from wan_triton.serving.triton import error_response, outcome_of, read_inputs, read_request_json

logger = logging.getLogger("wan_triton.serving")


class Scheduler(DeviceModel):
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
                    responses[n] = response(output_torch(io.LATENTS.name, result.float()))
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
            _wait_for_the_device(results)
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
        stop_workers(self.denoiser)
        super().finalize()


def _wait_for_the_device(results: list) -> None:
    """The loop only queues the GPU's work, up to a whole step ahead of it: wait for the device, so that the time read
    next (the log line, the `wan_denoise_steps_per_second` rate) is the denoising's and not the host's."""
    for result in results:
        if isinstance(result, torch.Tensor) and result.is_cuda:
            torch.cuda.synchronize(result.device)
            return
