"""The denoising loop of Wan2.2 T2V, step for step as diffusers' `WanPipeline` runs it.

Flow-matching UniPC from the checkpoint's scheduler config; classifier-free guidance with the prompt and the
negative prompt run as one batch of 2 (one forward per step instead of two), and several requests of one shape
as one batch of all their rows (`Denoiser.run_batch`); the high-noise expert
`transformer` with `guidance_scale` while t >= boundary_ratio x num_train_timesteps, then the low-noise expert
`transformer_2` with `guidance_scale_2`. The initial noise is drawn as `WanPipeline` draws it, from
`torch.Generator("cpu").manual_seed(seed)`, so a served video can be reproduced offline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from wan_triton.config.request import GenerationRequest
from wan_triton.model.checkpoint import MAX_SEQUENCE_LENGTH, Checkpoint
from wan_triton.model.engine import Engine

logger = logging.getLogger(__name__)

# Called after each step with (step_index, num_steps); raising from it stops the loop (cancellation).
StepCallback = Callable[[int, int], None]
# Called during each step, before the solver update, with (step_index, clean-latent estimate x0); for previews.
EstimateCallback = Callable[[int, torch.Tensor], None]


class CfgParallel(Protocol):
    """Runs this rank's half of a guided batch of 2 and gathers both halves (`parallel.cfg.CfgParallel`)."""

    def noise_pred(
        self, expert: Engine, model_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor: ...


class ExpertSwapper(Protocol):
    """Holds one expert's weights on the device and brings in the other's (`runtime.residency.ExpertSwapper`)."""

    def prefetch(self, expert: str) -> None: ...

    def activate(self, expert: str) -> None: ...


def latent_shape(ckpt: Checkpoint, height: int, width: int, num_frames: int) -> tuple[int, int, int, int, int]:
    """[1, C, latent_frames, height / 8, width / 8] for one video."""
    sp = ckpt.vae_scale_factor_spatial
    return (1, ckpt.latent_channels, ckpt.num_latent_frames(num_frames), height // sp, width // sp)


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The same draw as diffusers' `randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed))`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)


@dataclass
class Denoiser:
    """Both experts and the solver settings of one checkpoint."""

    ckpt: Checkpoint
    experts: dict[str, Engine]  # "transformer" (high noise) and, when the checkpoint has it, "transformer_2"
    device: torch.device
    dtype: torch.dtype  # the experts' precision; latents stay float32 between steps, as in the reference
    # Set when both experts share one device module (`expert_residency: swap`): told which expert the next step
    # needs, so it can copy that expert in while the current step runs.
    swapper: ExpertSwapper | None = None
    # A rank of a CFG-parallel group (wan_triton.parallel): runs its half of the guided batch. None: one process.
    cfg_parallel: CfgParallel | None = None

    @property
    def boundary_timestep(self) -> float | None:
        ratio = self.ckpt.boundary_ratio
        return None if ratio is None else ratio * self.ckpt.num_train_timesteps

    def expert_for(self, t: torch.Tensor) -> str:
        """`transformer` (high noise) while t >= the boundary, then `transformer_2`."""
        boundary = self.boundary_timestep
        return "transformer" if boundary is None or t >= boundary else "transformer_2"

    def __call__(
        self,
        request: GenerationRequest,
        prompt_embeds: torch.Tensor,
        on_step: StepCallback | None = None,
        on_estimate: EstimateCallback | None = None,
        estimate_every: int = 1,
    ) -> torch.Tensor:
        """Run every step and return the final latents.

        Args:
            request: a validated request (size, steps, seed, guidance pair).
            prompt_embeds: [2, text_len, text_dim] (prompt, negative prompt) with guidance, else [1, ...].
            on_step: progress / cancellation hook.
            on_estimate: receives each step's clean-latent estimate (flow matching: x0 = latents - sigma x noise_pred).
            estimate_every: k: only after steps k, 2k, ... (what a preview every k steps shows).
        Returns:
            latents, float32 [1, C, latent_frames, height / 8, width / 8], on `self.device`.
        """
        (result,) = self.run_batch([BatchItem(request, prompt_embeds, on_step, on_estimate, estimate_every)])
        if isinstance(result, BaseException):
            raise result
        return result

    def run_batch(self, items: list[BatchItem]) -> list[torch.Tensor | BaseException]:
        """Denoise several requests of one shape together: each step runs the expert once on every request's
        rows (cond and uncond of each), then guidance and the solver update per request.

        Every request keeps its own initial noise (its seed), guidance scales and UniPC solver (the multistep
        solver keeps per-request history); `on_estimate` sees each request's clean estimate before its solver
        update. A request whose hook raises is dropped from the batch; the others go on. All items must share
        `batch_key`; the result list holds each item's latents (float32 [1, C, latent_frames, height / 8,
        width / 8]) or the exception that stopped it, in item order.
        """
        if not items:
            return []
        key = batch_key(items[0].request)
        for item in items:
            if batch_key(item.request) != key:
                raise ValueError(f"run_batch needs one shape, got {batch_key(item.request)} and {key}")
        first = items[0].request
        cfg = first.do_classifier_free_guidance
        rows = 2 if cfg else 1
        results: list[torch.Tensor | BaseException | None] = [None] * len(items)
        states: dict[int, _ItemState] = {}
        shape = latent_shape(self.ckpt, first.height, first.width, first.num_frames)
        for index, item in enumerate(items):
            if item.prompt_embeds.shape[0] != rows:
                results[index] = ValueError(f"expected {rows} prompt embeddings, got {item.prompt_embeds.shape[0]}")
                continue
            solver = self.ckpt.make_solver()
            solver.set_timesteps(first.num_inference_steps, device=self.device)
            solver.set_begin_index(0)
            latents = initial_noise(shape, item.request.seed).to(self.device)
            states[index] = _ItemState(solver, latents, item.prompt_embeds.to(self.device, self.dtype))
        if not states:
            return results  # type: ignore[return-value]
        timesteps = next(iter(states.values())).solver.timesteps
        schedule = [self.expert_for(t) for t in timesteps]

        for i, t in enumerate(timesteps):
            high_noise = schedule[i] == "transformer"
            expert = self.experts[schedule[i]]
            if self.swapper is not None:
                # After the last step, the next request starts with the high-noise expert.
                self.swapper.prefetch(schedule[i + 1] if i + 1 < len(schedule) else "transformer")
            active = list(states)
            scales = [
                (items[n].request.guidance_scale if high_noise else items[n].request.guidance_scale_2) if cfg else None
                for n in active
            ]
            preds = batch_noise_preds(
                expert,
                [states[n].latents for n in active],
                t,
                [states[n].embeds for n in active],
                scales,
                self.cfg_parallel,
            )
            for n, noise_pred in zip(active, preds, strict=True):
                state, item = states[n], items[n]
                try:
                    if item.on_estimate is not None and (i + 1) % item.estimate_every == 0:
                        item.on_estimate(i, clean_estimate(state.solver, i, state.latents, noise_pred))
                    state.latents = state.solver.step(noise_pred, t, state.latents, return_dict=False)[0]
                    if item.on_step is not None:
                        item.on_step(i, len(timesteps))
                except Exception as exc:  # noqa: BLE001 - stops this request only (cancellation, deadline)
                    results[n] = exc
                    del states[n]
            if not states:
                break
        for n, state in states.items():
            results[n] = state.latents
        return results  # type: ignore[return-value]


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch: the validated request, its prompt embeddings and its step hooks."""

    request: GenerationRequest
    prompt_embeds: torch.Tensor  # [2, text_len, text_dim] with guidance, else [1, ...]
    on_step: StepCallback | None = None
    on_estimate: EstimateCallback | None = None  # the clean estimate of each step, before its solver update
    estimate_every: int = 1  # on_estimate only after steps k, 2k, ...: the others are not computed (nor sent)
    # The conditioning image (image-to-video), uint8 [height, width, 3] at the video's size; None without one.
    condition_image: np.ndarray | None = None


@dataclass
class _ItemState:
    solver: object  # the request's own UniPC solver
    latents: torch.Tensor
    embeds: torch.Tensor


def group_by_shape(requests: list[GenerationRequest], max_batch_size: int) -> list[list[int]]:
    """Indices of `requests` in groups that can run as one batch: equal `batch_key`, at most `max_batch_size`
    each, in arrival order (a group's position is that of its first request)."""
    groups: dict[tuple, list[list[int]]] = {}
    order: list[list[int]] = []
    for index, request in enumerate(requests):
        chunks = groups.setdefault(batch_key(request), [])
        if not chunks or len(chunks[-1]) >= max_batch_size:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(index)
    return order


def batch_key(request: GenerationRequest) -> tuple[int, int, int, int, bool, bool]:
    """Requests with equal keys can share expert forwards: same latent shape, same timesteps, same rows, and all
    with a conditioning image or all without (image-to-video and text-to-video inputs differ)."""
    return (
        request.height,
        request.width,
        request.num_frames,
        request.num_inference_steps,
        request.do_classifier_free_guidance,
        request.has_image,
    )


def warm_up(denoiser: Denoiser, height: int, width: int, num_frames: int) -> None:
    """One guided step of each expert at this shape, so compilation and allocation happen before serving."""
    latents = initial_noise(latent_shape(denoiser.ckpt, height, width, num_frames), 0).to(denoiser.device)
    embeds = torch.zeros(2, MAX_SEQUENCE_LENGTH, denoiser.ckpt.text_dim, device=denoiser.device, dtype=denoiser.dtype)
    for expert in denoiser.experts.values():
        solver = denoiser.ckpt.make_solver()
        solver.set_timesteps(1, device=denoiser.device)
        denoise_step(expert, solver, latents, solver.timesteps[0], embeds, 1.0, denoiser.cfg_parallel)
    if denoiser.swapper is not None:
        denoiser.swapper.activate("transformer")  # requests start with the high-noise expert


def denoise_step(
    expert: Engine,
    solver,
    latents: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    guidance_scale: float | None,
    cfg_parallel: CfgParallel | None = None,
) -> torch.Tensor:
    """One step: the expert's forward (cond and uncond as one batch of 2 with guidance), the guidance combine,
    and the solver update. The benchmarks time this same function.

    Args:
        latents: float32 [1, C, T, h, w].
        t: the step's timestep (scalar tensor).
        embeds: [2, text_len, text_dim] (prompt, negative prompt) with guidance, else [1, ...], in the expert's dtype.
        guidance_scale: None turns guidance off.
        cfg_parallel: with a batch of 2, this rank runs one half and exchanges noise predictions with the other.
    """
    noise_pred = guided_noise_pred(expert, latents, t, embeds, guidance_scale, cfg_parallel)
    return solver.step(noise_pred, t, latents, return_dict=False)[0]


def clean_estimate(solver, step_index: int, latents: torch.Tensor, noise_pred: torch.Tensor) -> torch.Tensor:
    """The flow-matching estimate of the clean latents at this step: x0 = x_t - sigma_t x v (what UniPC's
    `convert_model_output` computes for `prediction_type="flow_prediction"`). float32, like the latents."""
    sigma = solver.sigmas[step_index].to(latents.device, torch.float32)
    return latents - sigma * noise_pred.float()


def guided_noise_pred(
    expert: Engine,
    latents: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    guidance_scale: float | None,
    cfg_parallel: CfgParallel | None = None,
) -> torch.Tensor:
    """The expert's prediction for this step, guided (see `denoise_step` for the arguments)."""
    batch = embeds.shape[0]
    if cfg_parallel is not None and batch == 2:
        noise_pred = cfg_parallel.noise_pred(expert, latents.to(embeds.dtype), t, embeds)
    else:
        model_input = latents.to(embeds.dtype).expand(batch, *latents.shape[1:])
        noise_pred = expert.run(
            {"hidden_states": model_input, "timestep": t.expand(batch), "encoder_hidden_states": embeds}
        )["noise_pred"]
    return _guide(noise_pred, guidance_scale)


def _guide(noise_pred: torch.Tensor, guidance_scale: float | None) -> torch.Tensor:
    """Classifier-free guidance on one request's rows [cond, uncond]; None: guidance off (a single row)."""
    if guidance_scale is None:
        return noise_pred
    cond, uncond = noise_pred[0:1], noise_pred[1:2]
    return uncond + guidance_scale * (cond - uncond)


def batch_noise_preds(
    expert: Engine,
    latents: list[torch.Tensor],
    t: torch.Tensor,
    embeds: list[torch.Tensor],
    guidance_scales: list[float | None],
    cfg_parallel: CfgParallel | None = None,
) -> list[torch.Tensor]:
    """`guided_noise_pred` for several requests of one shape: one expert forward on all their rows (each
    request's cond and uncond rows, in request order), then each request's guidance combine.

    With one request this is `guided_noise_pred` exactly (the same forward input and combine).
    """
    if len(latents) == 1:
        return [guided_noise_pred(expert, latents[0], t, embeds[0], guidance_scales[0], cfg_parallel)]
    if cfg_parallel is not None:
        raise ValueError("a CFG-parallel group denoises one request at a time")
    rows = embeds[0].shape[0]
    model_input = torch.cat([x.to(embeds[0].dtype).expand(rows, *x.shape[1:]) for x in latents])
    all_embeds = torch.cat(embeds)
    noise_pred = expert.run(
        {"hidden_states": model_input, "timestep": t.expand(all_embeds.shape[0]), "encoder_hidden_states": all_embeds}
    )["noise_pred"]
    return [_guide(noise_pred[n * rows : (n + 1) * rows], scale) for n, scale in enumerate(guidance_scales)]
