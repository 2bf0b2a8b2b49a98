"""The parallel plans on the image-conditioned kinds (CPU, gloo, world size 2): cfg, Ulysses and tp ranks denoising
a TI2V-5B request with an image (per-token timesteps, whose embeddings the Ulysses ranks split with the tokens)
and an I2V-A14B request (36-channel input) give the single-process latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from checks import rel_l2
from factories import OTHER_I2V, OTHER_TI2V, make_embeds, make_request
from wan_triton.config.deployment import ComponentConfig
from wan_triton.config.plan import ParallelPlan
from wan_triton.model.checkpoint import Checkpoint

TORCH_CPU = ComponentConfig(engine="torch")
PLANS = [ParallelPlan(cfg=2), ParallelPlan(ulysses=2), ParallelPlan(tp=2)]
# 4 heads and an FFN of 64 split over tp 2; otherwise the sizes of the parity tests' checkpoints.
SPLITTABLE = dict(num_attention_heads=4, ffn_dim=64, num_layers=2)
# 9 frames (3 latent frames) of 2x3 tokens after the 1x2x2 patch: 18 tokens, split over 2 Ulysses ranks.
REQUESTS = {
    "ti2v": make_request(height=64, width=96, num_frames=9, num_inference_steps=3, guidance_scale=5.0, seed=9),
    "i2v": make_request(height=32, width=48, num_frames=9, num_inference_steps=4, guidance_scale=3.5, seed=8),
}


def _image(request) -> np.ndarray:
    rng = np.random.default_rng(request.seed)
    return rng.integers(0, 256, size=(request.height, request.width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("family_parallel")
    return {
        "ti2v": make_tiny_checkpoint(root / "ti2v", TinyConfig(**{**OTHER_TI2V, **SPLITTABLE})),
        "i2v": make_tiny_checkpoint(root / "i2v", TinyConfig(**{**OTHER_I2V, **SPLITTABLE})),
    }


def _denoise_each_plan(rank: int, checkpoints: dict[str, Path], plans: list[ParallelPlan]) -> dict:
    from wan_triton.parallel.process_groups import create_groups
    from wan_triton.workers.rank import build_rank_denoiser

    out = {}
    for kind, checkpoint in checkpoints.items():
        ckpt = Checkpoint.open(checkpoint)
        request = REQUESTS[kind]
        for plan in plans:
            denoiser = build_rank_denoiser(ckpt, TORCH_CPU, create_groups(plan), torch.device("cpu"))
            embeds = make_embeds(ckpt.text_dim, rows=2, seed=1)
            out[(kind, str(plan))] = denoiser(request, embeds, condition_image=_image(request))
    return out


@pytest.fixture(scope="module")
def world_results(checkpoints):
    from wan_triton.workers.world import run_world

    return run_world(2, _denoise_each_plan, (checkpoints, PLANS))


@pytest.fixture(scope="module")
def single(checkpoints):
    from wan_triton.components import build_denoiser
    from wan_triton.workers.world import cpu_threads_per_rank

    out = {}
    # With each rank's thread count: the CPU kernels' sums (the VAE encoder's convolutions above all) split their
    # work by thread, and on some CPUs (AVX-512 ones among them) another split rounds differently, which would
    # leave the condition frame's comparison below measuring the thread count instead of the plan.
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads_per_rank(2))
    try:
        for kind, checkpoint in checkpoints.items():
            ckpt = Checkpoint.open(checkpoint)
            denoiser = build_denoiser(ckpt, TORCH_CPU, Path("/nonexistent"), vae_encoder=TORCH_CPU)
            request = REQUESTS[kind]
            embeds = make_embeds(ckpt.text_dim, rows=2, seed=1)
            out[kind] = denoiser(request, embeds, condition_image=_image(request))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("kind", ["ti2v", "i2v"])
def test_plan_matches_one_process(world_results, single, plan, kind):
    latents = [r[(kind, str(plan))] for r in world_results]
    assert torch.equal(latents[0], latents[1])  # every rank applies the same update to the same predictions
    rel = rel_l2(latents[0], single[kind])
    print(f"{kind} {plan}: latent relative L2 {rel:.2e}")
    assert rel < 1e-4, rel
    if kind == "ti2v":
        # The condition frame comes back as it was encoded: the first latent frame is not denoised.
        assert torch.equal(latents[0][:, :, 0], single[kind][:, :, 0])
