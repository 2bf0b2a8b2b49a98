"""The denoising loop of Wan2.2 T2V, step for step as diffusers' `WanPipeline` runs it.

Flow-matching UniPC from the checkpoint's scheduler config; classifier-free guidance with the prompt and the
negative prompt run as one batch of 2 (one forward per step instead of two); the high-noise expert
`transformer` with `guidance_scale` while t >= boundary_ratio x num_train_timesteps, then the low-noise expert
`transformer_2` with `guidance_scale_2`. The initial noise is drawn as `WanPipeline` draws it, from
`torch.Generator("cpu").manual_seed(seed)`, so a served video can be reproduced offline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .checkpoint import MAX_SEQUENCE_LENGTH, Checkpoint
from .engines.base import Engine
from .request import GenerationRequest

if TYPE_CHECKING:
    from .parallel.cfg import CfgParallel
    from .residency import ExpertSwapper

logger = logging.getLogger(__name__)

# Called after each step with (step_index, num_steps); raising from it stops the loop (cancellation).
StepCallback = Callable[[int, int], None]


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
        self, request: GenerationRequest, prompt_embeds: torch.Tensor, on_step: StepCallback | None = None
    ) -> torch.Tensor:
        """Run every step and return the final latents.

        Args:
            request: a validated request (size, steps, seed, guidance pair).
            prompt_embeds: [2, text_len, text_dim] (prompt, negative prompt) with guidance, else [1, ...].
            on_step: progress / cancellation hook.
        Returns:
            latents, float32 [1, C, latent_frames, height / 8, width / 8], on `self.device`.
        """
        cfg = request.do_classifier_free_guidance
        if prompt_embeds.shape[0] != (2 if cfg else 1):
            raise ValueError(f"expected {2 if cfg else 1} prompt embeddings, got {prompt_embeds.shape[0]}")
        embeds = prompt_embeds.to(self.device, self.dtype)

        scheduler = self.ckpt.make_scheduler()
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps

        shape = latent_shape(self.ckpt, request.height, request.width, request.num_frames)
        latents = initial_noise(shape, request.seed).to(self.device)
        schedule = [self.expert_for(t) for t in timesteps]

        for i, t in enumerate(timesteps):
            expert = schedule[i]
            scale = request.guidance_scale if expert == "transformer" else request.guidance_scale_2
            if self.swapper is not None:
                # After the last step, the next request starts with the high-noise expert.
                self.swapper.prefetch(schedule[i + 1] if i + 1 < len(schedule) else "transformer")
            latents = denoise_step(
                self.experts[expert], scheduler, latents, t, embeds, scale if cfg else None, self.cfg_parallel
            )
            if on_step is not None:
                on_step(i, len(timesteps))
        return latents


def warm_up(denoiser: Denoiser, height: int, width: int, num_frames: int) -> None:
    """One guided step of each expert at this shape, so compilation and allocation happen before serving."""
    latents = initial_noise(latent_shape(denoiser.ckpt, height, width, num_frames), 0).to(denoiser.device)
    embeds = torch.zeros(2, MAX_SEQUENCE_LENGTH, denoiser.ckpt.text_dim, device=denoiser.device, dtype=denoiser.dtype)
    for expert in denoiser.experts.values():
        scheduler = denoiser.ckpt.make_scheduler()
        scheduler.set_timesteps(1, device=denoiser.device)
        denoise_step(expert, scheduler, latents, scheduler.timesteps[0], embeds, 1.0, denoiser.cfg_parallel)
    if denoiser.swapper is not None:
        denoiser.swapper.activate("transformer")  # requests start with the high-noise expert


def denoise_step(
    expert: Engine,
    scheduler,
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
    batch = embeds.shape[0]
    if cfg_parallel is not None and batch == 2:
        noise_pred = cfg_parallel.noise_pred(expert, latents.to(embeds.dtype), t, embeds)
    else:
        model_input = latents.to(embeds.dtype).expand(batch, *latents.shape[1:])
        noise_pred = expert.run(
            {"hidden_states": model_input, "timestep": t.expand(batch), "encoder_hidden_states": embeds}
        )["noise_pred"]
    if guidance_scale is not None:
        cond, uncond = noise_pred[0:1], noise_pred[1:2]
        noise_pred = uncond + guidance_scale * (cond - uncond)
    return scheduler.step(noise_pred, t, latents, return_dict=False)[0]
