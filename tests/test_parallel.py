"""Multi-rank denoising on CPU (gloo, several processes): every plan of world size 2 and 4 gives the frames of
world size 1 on a tiny model, and the plan is validated against the checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_frames_close

from wan_triton.checkpoint import Checkpoint
from wan_triton.deployment import ComponentConfig
from wan_triton.parallel.plan import ParallelPlan, PlanError, RankCoords, num_tokens
from wan_triton.request import GenerationRequest

TORCH_CPU = ComponentConfig(engine="torch")
PLANS = [
    ParallelPlan(cfg=2),
    ParallelPlan(ulysses=2),
    ParallelPlan(tp=2),
    ParallelPlan(cfg=2, ulysses=2),
    ParallelPlan(cfg=2, tp=2),
    ParallelPlan(ulysses=2, tp=2),
    ParallelPlan(ulysses=4),
    ParallelPlan(tp=4),
]


def _request(guidance: float, seed: int) -> GenerationRequest:
    # 32x64 pixels, 5 frames: 2 latent frames x 2 x 4 tokens = 16 tokens, divisible by every ulysses degree here.
    return GenerationRequest(
        prompt="p",
        negative_prompt="n",
        height=32,
        width=64,
        num_frames=5,
        num_inference_steps=4,
        seed=seed,
        guidance_scale=guidance,
        guidance_scale_2=max(1.0, guidance - 1.5),
        fps=16,
    )


# Guided with both experts (the boundary falls inside 4 steps at flow shift 5), and unguided (batch of 1: the cfg
# ranks run the same half).
CASES = [(_request(4.0, 3), 2), (_request(1.0, 4), 1)]


def _embeds(batch: int, text_dim: int) -> torch.Tensor:
    return torch.randn(batch, 512, text_dim, generator=torch.Generator().manual_seed(batch))


def _denoise_each_plan(rank: int, checkpoint: Path, plans: list[ParallelPlan]) -> dict:
    """Runs in every rank of a world of 4; plans smaller than the world run on its first ranks. Returns the
    latents per (plan, case) and what this rank's self-attention layers saw: (tokens, local heads, batch)."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    from wan_triton.parallel.groups import create_groups
    from wan_triton.parallel.rank import build_rank_denoiser

    seen: set[tuple[int, int, int]] = set()

    def record(module, args, kwargs):
        if isinstance(module, WanAttention) and not module.is_cross_attention:
            seen.add((args[0].shape[1], module.heads, args[0].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: record(m, a, None))
    ckpt = Checkpoint.open(checkpoint)
    out = {}
    for plan in plans:
        groups = create_groups(plan)
        if groups is None:
            continue
        denoiser = build_rank_denoiser(ckpt, TORCH_CPU, groups, torch.device("cpu"))
        for i, (request, batch) in enumerate(CASES):
            seen.clear()
            latents = denoiser(request, _embeds(batch, ckpt.text_dim))
            out[(str(plan), i)] = latents, sorted(seen)
    handle.remove()
    return out


@pytest.fixture(scope="module")
def world_results(tiny4_checkpoint):
    from wan_triton.parallel.world import run_world

    return run_world(4, _denoise_each_plan, (tiny4_checkpoint, PLANS))


@pytest.fixture(scope="module")
def single(tiny4_checkpoint):
    """World size 1: today's single-process path (components.build_denoiser), latents and decoded frames."""
    from wan_triton.components import build_denoiser, build_vae_decoder
    from wan_triton.video import to_uint8_frames

    ckpt = Checkpoint.open(tiny4_checkpoint)
    denoiser = build_denoiser(ckpt, TORCH_CPU, Path("/nonexistent"))
    vae = build_vae_decoder(ckpt, TORCH_CPU, Path("/nonexistent"))
    latents = [denoiser(request, _embeds(batch, ckpt.text_dim)) for request, batch in CASES]
    return latents, [to_uint8_frames(vae(x)) for x in latents], vae


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)), ids=["guided", "unguided"])
def test_plan_matches_world_size_1(world_results, single, plan, case):
    from wan_triton.video import to_uint8_frames

    ref_latents, ref_frames, vae = single
    ranks = [r[(str(plan), case)] for r in world_results[: plan.world_size]]
    latents = ranks[0][0]
    # Every rank runs the same solver update on the same exchanged predictions: the latents agree bitwise.
    for other, _ in ranks[1:]:
        assert torch.equal(other, latents)
    # Each rank really ran its share: 16 tokens / ulysses, 4 heads / tp, and half the guided batch with cfg 2.
    batch = 1 if plan.cfg == 2 or CASES[case][1] == 1 else 2
    for _, seen in ranks:
        assert seen == [(16 // plan.ulysses, 4 // plan.tp, batch)], seen
    rel = _rel_l2(latents, ref_latents[case])
    print(f"{plan} case {case}: latent relative L2 {rel:.2e}")
    assert rel < 1e-4, rel
    assert_frames_close(to_uint8_frames(vae(latents)), ref_frames[case])


def test_rank_layout_and_groups():
    plan = ParallelPlan(cfg=2, ulysses=2, tp=2)
    assert plan.world_size == 8
    assert plan.coords(0) == RankCoords(0, 0, 0)
    assert plan.coords(5) == RankCoords(1, 0, 1)
    assert [plan.rank_of(plan.coords(r)) for r in range(8)] == list(range(8))
    groups = plan.group_ranks()
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["ulysses"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["cfg"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_plan_is_validated_against_the_checkpoint():
    config = {"num_attention_heads": 40, "ffn_dim": 13824}  # Wan2.2 A14B
    ParallelPlan(cfg=2, ulysses=4, tp=1).check_transformer(config)
    ParallelPlan(ulysses=2, tp=4).check_transformer(config)
    with pytest.raises(PlanError, match="num_attention_heads 40 is not divisible by ulysses x tp = 16"):
        ParallelPlan(ulysses=4, tp=4).check_transformer(config)
    with pytest.raises(PlanError, match="ffn_dim 13824 is not divisible by tp = 5"):
        ParallelPlan(tp=5).check_transformer({"num_attention_heads": 40, "ffn_dim": 13824})
    with pytest.raises(PlanError, match="world size cfg x ulysses x tp = 4, got 2"):
        ParallelPlan(cfg=2, tp=2).check_world_size(2)
    with pytest.raises(ValueError, match="cfg"):
        ParallelPlan(cfg=3)
    assert num_tokens(21, 90, 160, (1, 2, 2)) == 21 * 45 * 80


def test_deployment_plan_setting():
    from wan_triton.deployment import ComponentConfig

    assert ComponentConfig(engine="torch").parallel == ParallelPlan()
    assert ComponentConfig(engine="torch", parallel={"cfg": 2, "tp": 2}).parallel.world_size == 4
    with pytest.raises(ValueError, match="needs engine torch"):
        ComponentConfig(engine="onnxruntime", parallel={"tp": 2})
    with pytest.raises(ValueError, match="extra"):
        ComponentConfig(engine="torch", parallel={"pp": 2})


def test_single_rank_path_untouched(single):
    # World size 1 through the unchanged path must stay the reference it was (no groups, no extra processes).
    latents, _, _ = single
    assert all(np.isfinite(x.numpy()).all() for x in latents)
