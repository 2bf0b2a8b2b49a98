"""Multi-rank denoising on CPU (gloo, several processes): every plan of world size 2 and 4 gives the frames of
world size 1 on a tiny model, tp shards written at build time hold and load the same weights, and a build refuses a
plan the checkpoint cannot split. The plan settings as pure logic: tests/unit/test_parallel_settings.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from checks import assert_frames_close, rel_l2
from factories import load_deployment, make_embeds, make_request
from wan_triton.config.deployment import ComponentConfig
from wan_triton.config.plan import ParallelPlan, PlanError
from wan_triton.config.request import GenerationRequest
from wan_triton.model.checkpoint import Checkpoint

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
    return make_request(
        width=64,
        num_inference_steps=4,
        seed=seed,
        guidance_scale=guidance,
        guidance_scale_2=max(1.0, guidance - 1.5),
    )


# Guided with both experts (the boundary falls inside 4 steps at flow shift 5), and unguided (batch of 1: the cfg
# ranks run the same half).
CASES = [(_request(4.0, 3), 2), (_request(1.0, 4), 1)]


def _denoise_each_plan(rank: int, checkpoint: Path, plans: list[ParallelPlan], shards: Path) -> dict:
    """Runs in every rank of a world of 4; plans smaller than the world run on its first ranks. Returns the
    latents per (plan, case) and what this rank's self-attention layers saw: (tokens, local heads, batch)."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    from wan_triton.parallel.process_groups import create_groups
    from wan_triton.workers.rank import build_rank_denoiser

    seen: set[tuple[int, int, int]] = set()

    def record(module, args, kwargs):
        if isinstance(module, WanAttention) and not module.is_cross_attention:
            seen.add((args[0].shape[1], module.heads, args[0].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: record(m, a, None))
    ckpt = Checkpoint.open(checkpoint)
    out = {}
    # The last run loads tp 2 from the build-time shard files instead of cutting the whole experts.
    for plan, folder in [(plan, None) for plan in plans] + [(SHARDED_PLAN, shards)]:
        groups = create_groups(plan)
        if groups is None:
            continue
        denoiser = build_rank_denoiser(ckpt, TORCH_CPU, groups, torch.device("cpu"), folder)
        for i, (request, batch) in enumerate(CASES):
            seen.clear()
            latents = denoiser(request, make_embeds(ckpt.text_dim, rows=batch, seed=batch))
            out[(str(plan) + ("+shards" if folder else ""), i)] = latents, sorted(seen)
    handle.remove()
    return out


SHARDED_PLAN = ParallelPlan(tp=2)


@pytest.fixture(scope="module")
def shards(tiny4_checkpoint, tmp_path_factory) -> Path:
    from wan_triton.parallel.tp_shards import write_tp_shards

    return write_tp_shards(Checkpoint.open(tiny4_checkpoint), SHARDED_PLAN, "float32", tmp_path_factory.mktemp("tp2"))


@pytest.fixture(scope="module")
def world_results(tiny4_checkpoint, shards):
    from wan_triton.workers.world import run_world

    return run_world(4, _denoise_each_plan, (tiny4_checkpoint, PLANS, shards))


@pytest.fixture(scope="module")
def single(tiny4_checkpoint):
    """World size 1: today's single-process path (components.build_denoiser), latents and decoded frames."""
    from wan_triton.components import build_denoiser, build_vae_decoder
    from wan_triton.model.frames import to_uint8_frames

    ckpt = Checkpoint.open(tiny4_checkpoint)
    denoiser = build_denoiser(ckpt, TORCH_CPU, Path("/nonexistent"))
    vae = build_vae_decoder(ckpt, TORCH_CPU, Path("/nonexistent"))
    latents = [denoiser(request, make_embeds(ckpt.text_dim, rows=batch, seed=batch)) for request, batch in CASES]
    return latents, [to_uint8_frames(vae(x)) for x in latents], vae


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)), ids=["guided", "unguided"])
def test_plan_matches_world_size_1(world_results, single, plan, case):
    from wan_triton.model.frames import to_uint8_frames

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
    rel = rel_l2(latents, ref_latents[case])
    frames = to_uint8_frames(vae(latents))
    diff = np.abs(frames.astype(np.int16) - ref_frames[case].astype(np.int16))
    print(f"{plan} case {case}: latent relative L2 {rel:.2e}, frames max {diff.max()} mean {diff.mean():.4f} levels")
    assert rel < 1e-4, rel
    assert_frames_close(frames, ref_frames[case])


def test_single_rank_path_untouched(single):
    # World size 1 through the unchanged path must stay the reference it was (no groups, no extra processes).
    latents, _, _ = single
    assert all(np.isfinite(x.numpy()).all() for x in latents)


def test_loading_build_time_shards_gives_the_same_latents(world_results):
    for case in range(len(CASES)):
        cut, _ = world_results[0][(str(SHARDED_PLAN), case)]
        loaded, seen = world_results[0][(str(SHARDED_PLAN) + "+shards", case)]
        assert torch.equal(loaded, cut)
        assert seen[0][1] == 2  # 4 heads over tp 2


def test_shard_files_hold_exactly_the_sharded_module(tiny4_checkpoint, shards):
    """The build's name rules (TP_RULES) and the module surgery (shard_tensor_parallel) cut the same tensors."""
    from safetensors.torch import load_file

    from wan_triton.parallel.sharding import shard_tensor_parallel

    ckpt = Checkpoint.open(tiny4_checkpoint)
    for j in range(2):
        module = ckpt.load_transformer("transformer")
        shard_tensor_parallel(module, j, 2, group=None)
        expected = module.state_dict()
        got = load_file(str(shards / "transformer" / f"tp{j}-of-2.safetensors"))
        assert sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
    assert got["blocks.0.attn1.to_q.weight"].shape == (16, 32)  # 2 of 4 heads of 8
    assert got["blocks.0.ffn.net.2.weight"].shape == (32, 32)  # 32 of 64 FFN columns


def test_manifest_mismatch_is_refused(tiny4_checkpoint, shards, tmp_path):
    import json
    import shutil

    from wan_triton.parallel.tp_shards import read_manifest

    ckpt = Checkpoint.open(tiny4_checkpoint)
    manifest = read_manifest(shards, ckpt, SHARDED_PLAN, "float32")
    assert manifest["plan"] == {"cfg": 1, "ulysses": 1, "tp": 2}
    assert manifest["experts"]["transformer"]["tensor_dtypes"] == {"float32": 69}
    assert len(manifest["experts"]["transformer"]["source_sha256"]) == 64
    with pytest.raises(PlanError, match="built for plan cfg1xulysses1xtp2, the deployment runs cfg2xulysses1xtp2"):
        read_manifest(shards, ckpt, ParallelPlan(cfg=2, tp=2), "float32")
    with pytest.raises(PlanError, match="built in float32, the deployment runs bfloat16"):
        read_manifest(shards, ckpt, SHARDED_PLAN, "bfloat16")
    # Same layout, other weights: a copy of the checkpoint whose expert was re-saved with one tensor changed.
    other = tmp_path / "other"
    shutil.copytree(tiny4_checkpoint, other)
    from safetensors.torch import load_file, save_file

    weights = other / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["proj_out.bias"] = state["proj_out.bias"] + 1
    save_file(state, str(weights), metadata={"format": "pt", "changed": "yes"})
    with pytest.raises(PlanError, match="transformer was built from other weights"):
        read_manifest(shards, Checkpoint.open(other), SHARDED_PLAN, "float32")
    assert json.loads((shards / "manifest.json").read_text())["tp"] == 2


def test_loader_refuses_a_repository_built_for_another_plan(tiny4_checkpoint, shards, tmp_path):
    import shutil

    from wan_triton.parallel.tp_shards import find_shards

    ckpt = Checkpoint.open(tiny4_checkpoint)
    version = tmp_path / "1"
    shutil.copytree(shards, version / "tp2-float32")
    assert find_shards(version, ckpt, SHARDED_PLAN, "float32") == version / "tp2-float32"
    for plan in (ParallelPlan(tp=4), ParallelPlan(cfg=2)):
        with pytest.raises(
            PlanError, match=f"built with tp shards for plan cfg1xulysses1xtp2 in float32, the deployment runs {plan}"
        ):
            find_shards(version, ckpt, plan, "float32")
    assert find_shards(tmp_path / "empty", ckpt, ParallelPlan(ulysses=2), "float32") is None


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"parallel": ParallelPlan(ulysses=3)}, "num_attention_heads 4 is not divisible by ulysses x tp = 3"),
        (
            {"parallel": ParallelPlan(ulysses=2), "ulysses_head_groups": 3},
            "ulysses_head_groups 3 does not divide the 2 heads of a rank",
        ),
    ],
    ids=["heads", "head-groups"],
)
def test_build_refuses_a_plan_that_does_not_fit(tiny4_checkpoint, tmp_path, capsys, update, reason):
    from wan_build.__main__ import main as build_main

    deployment = load_deployment("cpu_parallel")
    cfg = deployment.components.denoiser.model_copy(update=update)
    bad = deployment.model_copy(update={"components": deployment.components.model_copy(update={"denoiser": cfg})})
    path = tmp_path / "bad.json"
    path.write_text(bad.to_json())
    args = ["--model", str(tiny4_checkpoint), "--deployment", str(path), "--repo", str(tmp_path / "repo")]
    assert build_main([*args, "--artifacts-root", str(tmp_path / "artifacts")]) == 1
    assert not (tmp_path / "repo").exists()
    err = capsys.readouterr().err
    assert f"plan {cfg.parallel} does not fit the checkpoint: {reason}" in err


def _ulysses_qk_layouts(rank: int, checkpoint: Path) -> dict:
    """One forward of a ulysses2 rank's expert with Q and K normalised and rotated straight into the all-to-all's
    chunk order, then with the earlier layout (normalise, rotate, then copy into chunk order), then chunked with
    fused projections; and how often the chunked path ran."""
    from wan_triton.kernels import attention
    from wan_triton.parallel import sharding as parallel_model
    from wan_triton.parallel.process_groups import create_groups

    groups = create_groups(ParallelPlan(ulysses=2))
    module = Checkpoint.open(checkpoint).load_transformer("transformer")
    parallel_model.parallelize(module, groups, "reference", torch.device("cpu"))
    calls = []
    chunked = parallel_model._normalised_rotated_chunks
    parallel_model._normalised_rotated_chunks = lambda *args: calls.append(1) or chunked(*args)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 8, generator=gen)  # 2 latent frames x 2 x 4 tokens after the 1x2x2 patch
    text = torch.randn(1, 512, module.config.text_dim, generator=gen)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return module(x, torch.tensor([700]), text, return_dict=False)[0]

    out = {"chunked": forward()}
    processors = {id(p): p for p in module.attn_processors.values()}.values()
    for processor in processors:
        processor.chunked_qk = False
    out["after"] = forward()
    out["calls_chunked"] = len(calls)
    for processor in processors:
        processor.chunked_qk = True
    attention.fuse_projections(module)
    out["fused"] = forward()
    out["layers"] = len(module.blocks)
    return out


def test_ulysses_qk_straight_into_chunk_order_matches_the_layout_after_norm(tiny4_checkpoint):
    from wan_triton.workers.world import run_world

    for rank in run_world(2, _ulysses_qk_layouts, (tiny4_checkpoint,)):
        assert rank["calls_chunked"] == 2 * rank["layers"]  # Q and K of every self-attention took the new path
        torch.testing.assert_close(rank["chunked"], rank["after"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rank["fused"], rank["after"], rtol=1e-5, atol=1e-5)
        assert rank["chunked"].abs().max() > 0
