"""Expert swapping (wan_triton.runtime.residency) on CPU: the same latents as both experts resident, the switch copied
in during the step before it, and recovery from a forward that fails half-way. The GPU side (side-stream copies,
peak memory, step time) is measured by benchmarks/expert_swap.py and checked by tests/gpu/test_gpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from factories import make_embeds, make_request
from wan_triton.components import build_denoiser
from wan_triton.config.deployment import ComponentConfig, EngineKind
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.denoise import warm_up

# 6 steps: the request crosses the expert boundary.
REQUEST = make_request()


def _config(residency: str) -> ComponentConfig:
    return ComponentConfig(engine=EngineKind.TORCH, expert_residency=residency)


@pytest.fixture(scope="module")
def ckpt(other_checkpoint) -> Checkpoint:
    return Checkpoint.open(other_checkpoint)


@pytest.fixture(scope="module")
def embeds(ckpt) -> torch.Tensor:
    return make_embeds(ckpt.text_dim, seed=1)


@pytest.fixture(scope="module")
def resident_latents(ckpt, embeds) -> torch.Tensor:
    return build_denoiser(ckpt, _config("resident"), Path("/nonexistent"))(REQUEST, embeds)


def test_swapped_experts_give_the_resident_latents(ckpt, embeds, resident_latents):
    denoiser = build_denoiser(ckpt, _config("swap"), Path("/nonexistent"))
    swapper = denoiser.swapper
    assert swapper is not None
    # One device module serves both experts.
    assert denoiser.experts["transformer"].eager is denoiser.experts["transformer_2"].eager

    solver = ckpt.make_solver()
    solver.set_timesteps(REQUEST.num_inference_steps)
    schedule = [denoiser.expert_for(t) for t in solver.timesteps]
    assert set(schedule) == {"transformer", "transformer_2"}, schedule  # the request crosses the boundary

    for _ in range(2):  # twice: the switch back to the high-noise expert happens at the end of each request
        latents = denoiser(REQUEST, embeds)
        torch.testing.assert_close(latents, resident_latents, rtol=0, atol=0)
        assert swapper.resident == "transformer"
    # Every switch (to the low-noise expert, and back for the next request) was copied in during a forward.
    assert swapper.swaps_blocking == 0
    assert swapper.swaps_overlapped == 4


def test_warm_up_leaves_the_first_expert_resident(ckpt):
    denoiser = build_denoiser(ckpt, _config("swap"), Path("/nonexistent"))
    warm_up(denoiser, 32, 32, 1)
    assert denoiser.swapper.resident == "transformer"


def test_a_failed_forward_forces_a_full_copy_next_time(ckpt, embeds, resident_latents):
    denoiser = build_denoiser(ckpt, _config("swap"), Path("/nonexistent"))
    swapper = denoiser.swapper
    calls = {"n": 0}
    real_forward = swapper.module.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        out = real_forward(*args, **kwargs)
        if calls["n"] == 3:  # the step that copies the low-noise expert in, blocks already overwritten
            raise RuntimeError("injected failure")
        return out

    swapper.module.forward = failing_forward
    solver = ckpt.make_solver()
    solver.set_timesteps(REQUEST.num_inference_steps)
    schedule = [denoiser.expert_for(t) for t in solver.timesteps]
    assert schedule[2] == "transformer" and schedule[3] == "transformer_2", schedule
    with pytest.raises(RuntimeError, match="injected failure"):
        denoiser(REQUEST, embeds)
    assert swapper.resident is None
    swapper.module.forward = real_forward
    torch.testing.assert_close(denoiser(REQUEST, embeds), resident_latents, rtol=0, atol=0)
    assert swapper.swaps_blocking == 1


def test_gpu_only_options_are_refused_elsewhere():
    with pytest.raises(ValidationError, match="cuda_graphs needs engine: torch and device: cuda"):
        ComponentConfig(engine=EngineKind.TORCH, device="cpu", cuda_graphs=True)
    with pytest.raises(ValidationError, match="expert_residency: swap needs engine: torch"):
        ComponentConfig(engine=EngineKind.ONNXRUNTIME, expert_residency="swap")
    with pytest.raises(ValidationError):
        ComponentConfig(engine=EngineKind.TORCH, expert_residency="sometimes")
