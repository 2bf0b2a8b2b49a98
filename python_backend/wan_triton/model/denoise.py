"""The denoising loop of Wan2.2, step for step as diffusers' `WanPipeline` (T2V-A14B, TI2V-5B without an image)
and `WanImageToVideoPipeline` (I2V-A14B, TI2V-5B with an image) run it.

Flow-matching UniPC from the checkpoint's scheduler config; classifier-free guidance with the prompt and the
negative prompt run as one batch of 2 (one forward per step instead of two), and several requests of one shape
as one batch of all their rows (`Denoiser.run_batch`); the high-noise expert
`transformer` with `guidance_scale` while t >= boundary_ratio x num_train_timesteps, then the low-noise expert
`transformer_2` with `guidance_scale_2`. The initial noise is drawn as `WanPipeline` draws it, from
`torch.Generator("cpu").manual_seed(seed)`, so a served video can be reproduced offline.

A request's condition image (`BatchItem.condition_image`) is VAE-encoded once (`Denoiser.vae_encoder`) into a
`Conditioning`: for I2V-A14B the first-frame mask and the condition latents join the noisy latents as extra
transformer input channels; for TI2V-5B (`expand_timesteps`) the condition replaces the first latent frame, whose
timestep is then 0. The experts of an `expand_timesteps` checkpoint take one timestep per latent frame, float32
[batch, latent_frames], which `call_transformer` spreads over that frame's tokens.
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


class ConditionEncoder(Protocol):
    """A condition image (uint8 [height, width, 3]) to normalized condition latents (`model.vae.VaeEncoder`)."""

    def __call__(self, image: np.ndarray, num_frames: int) -> torch.Tensor: ...


class ExpertSwapper(Protocol):
    """Holds one expert's weights on the device and brings in the other's (`runtime.residency.ExpertSwapper`)."""

    def prefetch(self, expert: str) -> None: ...

    def activate(self, expert: str) -> None: ...


def latent_shape(ckpt: Checkpoint, height: int, width: int, num_frames: int) -> tuple[int, int, int, int, int]:
    """[1, z_dim, latent_frames, height / stride, width / stride] for one video (stride: the VAE's, 8 or 16)."""
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
    # Encodes requests' condition images (checkpoints whose `image_input` is not "none").
    vae_encoder: ConditionEncoder | None = None

    def conditioning(self, item: BatchItem, shape: tuple[int, ...]) -> Conditioning:
        """What the item's condition image adds to every step (checked against the checkpoint's `image_input`)."""
        image, request = item.condition_image, item.request
        kind = self.ckpt.image_input
        if image is None:
            if kind == "required":
                raise ValueError("this image-to-video model needs a condition image")
            return Conditioning(frame_timesteps=self.ckpt.expand_timesteps)
        if kind == "none":
            raise ValueError("this text-to-video model takes no condition image")
        if image.shape != (request.height, request.width, 3):
            raise ValueError(
                f"condition image {image.shape} does not match the request's {request.height}x{request.width}"
            )
        if self.vae_encoder is None:
            raise RuntimeError("the denoiser was built without a VAE encoder for condition images")
        latent = self.vae_encoder(image, request.num_frames)
        if self.ckpt.expand_timesteps:
            return Conditioning(first_frame=latent.to(self.device), frame_timesteps=True)
        return Conditioning(concat=i2v_condition(latent, shape, self.ckpt.vae_scale_factor_temporal).to(self.device))

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
        condition_image: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Run every step and return the final latents.

        Args:
            request: a validated request (size, steps, seed, guidance pair).
            prompt_embeds: [2, text_len, text_dim] (prompt, negative prompt) with guidance, else [1, ...].
            on_step: progress / cancellation hook.
            on_estimate: receives each step's clean-latent estimate (flow matching: x0 = latents - sigma x noise_pred).
            estimate_every: k: only after steps k, 2k, ... (what a preview every k steps shows).
            condition_image: uint8 [height, width, 3] (`BatchItem.condition_image`), or None.
        Returns:
            latents, float32 [1, C, latent_frames, height / 8, width / 8], on `self.device`.
        """
        item = BatchItem(request, prompt_embeds, on_step, on_estimate, estimate_every, condition_image)
        (result,) = self.run_batch([item])
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
            try:
                condition = self.conditioning(item, shape)
            except Exception as exc:  # noqa: BLE001 - a bad image fails its request only
                results[index] = exc
                continue
            latents = initial_noise(shape, item.request.seed).to(self.device)
            states[index] = _ItemState(solver, latents, item.prompt_embeds.to(self.device, self.dtype), condition)
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
                [states[n].condition.model_input(states[n].latents) for n in active],
                [states[n].condition.timestep(t, shape[2]) for n in active],
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
            results[n] = state.condition.final_latents(state.latents)
        return results  # type: ignore[return-value]


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch: the validated request, its prompt embeddings and its step hooks."""

    request: GenerationRequest
    prompt_embeds: torch.Tensor  # [2, text_len, text_dim] with guidance, else [1, ...]
    on_step: StepCallback | None = None
    on_estimate: EstimateCallback | None = None  # the clean estimate of each step, before its solver update
    estimate_every: int = 1  # on_estimate only after steps k, 2k, ...: the others are not computed (nor sent)
    # The request's image, uint8 [height, width, 3] at the request's size; None: none (text-to-video).
    condition_image: np.ndarray | None = None


@dataclass(frozen=True)
class Conditioning:
    """What a request's condition image (or its absence) changes in each step, as the reference pipelines do."""

    # I2V: [1, 4 + z, T, h, w], the first-frame mask and the condition latents, after the noisy latents' channels.
    concat: torch.Tensor | None = None
    # TI2V with an image: its latents [1, z, 1, h, w], which replace the first latent frame (timestep 0 there).
    first_frame: torch.Tensor | None = None
    # expand_timesteps checkpoints: the experts take one timestep per latent frame.
    frame_timesteps: bool = False

    def frame_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """TI2V's `first_frame_mask` [1, 1, T, h, w]: 0 on the condition frame, 1 elsewhere."""
        mask = torch.ones(1, 1, *latents.shape[2:], dtype=latents.dtype, device=latents.device)
        mask[:, :, 0] = 0
        return mask

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        if self.concat is not None:
            return torch.cat([latents, self.concat], dim=1)
        return self.final_latents(latents)

    def final_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.first_frame is None:
            return latents
        mask = self.frame_mask(latents)
        return (1 - mask) * self.first_frame + mask * latents

    def timestep(self, t: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """The step's timestep as the experts take it: t itself, or float32 [T] per latent frame (0 on a condition
        frame), the values diffusers spreads over each frame's tokens (`mask[0][0][:, ::2, ::2] * t`)."""
        if not self.frame_timesteps:
            return t
        mask = torch.ones(num_latent_frames, dtype=torch.float32, device=t.device)
        if self.first_frame is not None:
            mask[0] = 0
        return mask * t


def i2v_condition(latent: torch.Tensor, shape: tuple[int, ...], temporal_stride: int) -> torch.Tensor:
    """I2V's extra channels [1, stride + z, T, h, w]: the mask of known frames (the first), folded stride frames per
    latent frame as `WanImageToVideoPipeline.prepare_latents` folds it, then the condition latents."""
    _, _, num_latent_frames, h, w = shape
    num_frames = (num_latent_frames - 1) * temporal_stride + 1
    mask = torch.ones(1, 1, num_frames, h, w)
    mask[:, :, list(range(1, num_frames))] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal_stride)
    mask = torch.concat([first, mask[:, :, 1:]], dim=2)
    mask = mask.view(1, -1, temporal_stride, h, w).transpose(1, 2)
    return torch.concat([mask.to(latent.device), latent], dim=1)


def call_transformer(
    module, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> torch.Tensor:
    """A `WanTransformer3DModel` forward as the engines run it. A timestep per latent frame, [B, T], is spread over
    each frame's tokens ([B, T x h/p x w/p], frame-major as diffusers flattens it); [B] goes in as it is."""
    if timestep.ndim == 2:
        _, p_h, p_w = module.config.patch_size
        tokens = (hidden_states.shape[3] // p_h) * (hidden_states.shape[4] // p_w)
        timestep = timestep[:, :, None].expand(-1, -1, tokens).flatten(1)
    return module(
        hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
    )[0]


@dataclass
class _ItemState:
    solver: object  # the request's own UniPC solver
    latents: torch.Tensor
    embeds: torch.Tensor
    condition: Conditioning = Conditioning()


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


def warm_up(denoiser: Denoiser, height: int, width: int, num_frames: int, guided: bool = True) -> None:
    """One step of each expert at this shape, so compilation and allocation happen before serving: guided (a
    batch of 2) or not (a batch of 1, what requests with guidance_scale <= 1 run). A model that takes images warms
    up with a synthetic (mid-grey) one, through the VAE encoder too (TI2V only when the denoiser has one)."""
    shape = latent_shape(denoiser.ckpt, height, width, num_frames)
    latents = initial_noise(shape, 0).to(denoiser.device)
    rows = 2 if guided else 1
    embeds = torch.zeros(
        rows, MAX_SEQUENCE_LENGTH, denoiser.ckpt.text_dim, device=denoiser.device, dtype=denoiser.dtype
    )
    request = GenerationRequest(
        prompt="",
        negative_prompt="",
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=1,
        seed=0,
        guidance_scale=1.0,
        guidance_scale_2=1.0,
        fps=16,
    )
    kind = denoiser.ckpt.image_input
    with_image = kind == "required" or (kind == "optional" and denoiser.vae_encoder is not None)
    image = np.full((height, width, 3), 128, dtype=np.uint8) if with_image else None
    condition = denoiser.conditioning(BatchItem(request, embeds, condition_image=image), shape)
    scale = 1.0 if guided else None
    for expert in denoiser.experts.values():
        solver = denoiser.ckpt.make_solver()
        solver.set_timesteps(1, device=denoiser.device)
        denoise_step(expert, solver, latents, solver.timesteps[0], embeds, scale, denoiser.cfg_parallel, condition)
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
    condition: Conditioning = Conditioning(),
) -> torch.Tensor:
    """One step: the expert's forward (cond and uncond as one batch of 2 with guidance), the guidance combine,
    and the solver update. The benchmarks time this same function.

    Args:
        latents: float32 [1, z, T, h, w].
        t: the step's timestep (scalar tensor).
        embeds: [2, text_len, text_dim] (prompt, negative prompt) with guidance, else [1, ...], in the expert's dtype.
        guidance_scale: None turns guidance off.
        cfg_parallel: with a batch of 2, this rank runs one half and exchanges noise predictions with the other.
        condition: the request's image conditioning (`Denoiser.conditioning`); the default is text-to-video.
    """
    model_input, timestep = condition.model_input(latents), condition.timestep(t, latents.shape[2])
    noise_pred = guided_noise_pred(expert, model_input, timestep, embeds, guidance_scale, cfg_parallel)
    return solver.step(noise_pred, t, latents, return_dict=False)[0]


def expert_rows(timestep: torch.Tensor, rows: int) -> torch.Tensor:
    """One request's timestep for `rows` batch rows: [rows] from a scalar, [rows, T] from per-frame timesteps."""
    return timestep.expand(rows, *timestep.shape)


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
    """The expert's prediction for this step, guided. `latents`: the model input [1, C_in, T, h, w] (the latents
    with any condition applied, `Conditioning.model_input`); `t`: the step's timestep as the expert takes it
    (`Conditioning.timestep`); the rest as in `denoise_step`."""
    batch = embeds.shape[0]
    if cfg_parallel is not None and batch == 2:
        noise_pred = cfg_parallel.noise_pred(expert, latents.to(embeds.dtype), t, embeds)
    else:
        model_input = latents.to(embeds.dtype).expand(batch, *latents.shape[1:])
        noise_pred = expert.run(
            {"hidden_states": model_input, "timestep": expert_rows(t, batch), "encoder_hidden_states": embeds}
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
    timesteps: list[torch.Tensor],
    embeds: list[torch.Tensor],
    guidance_scales: list[float | None],
    cfg_parallel: CfgParallel | None = None,
) -> list[torch.Tensor]:
    """`guided_noise_pred` for several requests of one shape: one expert forward on all their rows (each
    request's cond and uncond rows, in request order), then each request's guidance combine. `latents` and
    `timesteps` are each request's model input and timestep (`Conditioning.model_input`, `.timestep`).

    With one request this is `guided_noise_pred` exactly (the same forward input and combine).
    """
    if len(latents) == 1:
        return [guided_noise_pred(expert, latents[0], timesteps[0], embeds[0], guidance_scales[0], cfg_parallel)]
    if cfg_parallel is not None:
        raise ValueError("a CFG-parallel group denoises one request at a time")
    rows = embeds[0].shape[0]
    model_input = torch.cat([x.to(embeds[0].dtype).expand(rows, *x.shape[1:]) for x in latents])
    all_embeds = torch.cat(embeds)
    all_timesteps = torch.cat([expert_rows(t, rows) for t in timesteps])
    noise_pred = expert.run(
        {"hidden_states": model_input, "timestep": all_timesteps, "encoder_hidden_states": all_embeds}
    )["noise_pred"]
    return [_guide(noise_pred[n * rows : (n + 1) * rows], scale) for n, scale in enumerate(guidance_scales)]
