"""precision fp8 on a parallel plan, on CPU (gloo, several processes), against FP8 in one process.

Off CUDA the FP8 parts run their torch reference math (as tests/unit/test_fp8.py's `fp8_on_cpu`: the e4m3 rounding of
weights, activations and attention operands is real, the kernels are not), so what this checks is the plan's wiring:
every block linear layer of every rank in FP8 (the row-parallel ones too), self-attention in FP8 after the Ulysses
exchange, the inputs quantized in one pass, and the ranks agreeing. The kernels themselves are checked on the GPU
(tests/gpu/test_fp8_gpu.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checks import rel_l2
from factories import fp8_cpu_denoiser, make_embeds, make_request, use_fp8_on_cpu
from wan_triton.config.deployment import ComponentConfig, EngineKind
from wan_triton.config.plan import ParallelPlan
from wan_triton.model.checkpoint import Checkpoint

# (plan, Ulysses head groups): the exchanges whole, and in 2 groups started ahead of their waits.
VARIANTS = [
    (ParallelPlan(cfg=2), 1),
    (ParallelPlan(ulysses=2), 1),
    (ParallelPlan(ulysses=2), 2),
    (ParallelPlan(tp=2), 1),
    (ParallelPlan(ulysses=2, tp=2), 1),
]
# 32x64 pixels, 5 frames: 16 tokens; guided, crossing the expert switch within 4 steps.
REQUEST = make_request(width=64, num_inference_steps=4, seed=3, guidance_scale=4.0, guidance_scale_2=2.5)


def _config(plan: ParallelPlan, head_groups: int = 1) -> ComponentConfig:
    # Validated as deployed (cuda); the tests build on the CPU.
    return ComponentConfig(
        engine=EngineKind.TORCH,
        device="cuda",
        precision="fp8",
        attention="cudnn",
        parallel=plan,
        ulysses_head_groups=head_groups,
    )


def _name(plan: ParallelPlan, head_groups: int) -> str:
    return str(plan) + (f"+groups{head_groups}" if head_groups > 1 else "")


def _denoise_each_plan(rank: int, checkpoint: Path, variants: list[tuple[ParallelPlan, int]]) -> dict:
    """Runs in every rank of a world of 4; plans smaller than the world run on its first ranks. Returns the latents
    per plan and which of this rank's modules ran: FP8 linear layers (row-parallel ones among them), blocks, and
    blocks that took their inputs quantized in one pass."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from wan_triton.kernels import fp8
    from wan_triton.parallel.process_groups import create_groups
    from wan_triton.parallel.tensor_parallel import Fp8RowParallelLinear
    from wan_triton.workers.rank import build_rank_denoiser

    use_fp8_on_cpu()  # in this rank's own process
    ran: dict[str, set[int]] = {}

    def record(module, _args):
        kinds = {
            "fp8_layers": isinstance(module, fp8.Fp8Linear),
            "row_parallel": isinstance(module, Fp8RowParallelLinear),
            "blocks": isinstance(module, WanTransformerBlock),
            "one_pass_blocks": type(module) is fp8.Fp8TransformerBlock,
        }
        for kind in (k for k, hit in kinds.items() if hit):
            ran.setdefault(kind, set()).add(id(module))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    ckpt = Checkpoint.open(checkpoint)
    out = {}
    for plan, head_groups in variants:
        groups = create_groups(plan)
        if groups is None:
            continue
        denoiser = build_rank_denoiser(ckpt, _config(plan, head_groups), groups, torch.device("cpu"))
        ran.clear()
        latents = denoiser(REQUEST, make_embeds(ckpt.text_dim, rows=2, seed=2))
        out[_name(plan, head_groups)] = {"latents": latents} | {kind: len(ids) for kind, ids in ran.items()}
    handle.remove()
    return out


@pytest.fixture(scope="module")
def fp8_parallel_checkpoint(tmp_path_factory) -> Path:
    """Both experts, 4 heads of 16 and an FFN of 64: every layer's share on 2 tp ranks is a multiple of 16, as FP8
    GEMMs need."""
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    config = TinyConfig(num_attention_heads=4, attention_head_dim=16, ffn_dim=64, text_dim=32, seed=7)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_fp8_parallel", config)


@pytest.fixture(scope="module")
def world_results(fp8_parallel_checkpoint):
    from wan_triton.workers.world import run_world

    return run_world(4, _denoise_each_plan, (fp8_parallel_checkpoint, VARIANTS))


@pytest.fixture(scope="module")
def single(fp8_parallel_checkpoint):
    """FP8 in one process: the experts as `components.build_denoiser` serves them on one GPU."""
    with pytest.MonkeyPatch.context() as patch:
        use_fp8_on_cpu(patch.setattr)
        ckpt = Checkpoint.open(fp8_parallel_checkpoint)
        denoiser = fp8_cpu_denoiser(ckpt, cfg=_config(ParallelPlan()))
        return denoiser(REQUEST, make_embeds(ckpt.text_dim, rows=2, seed=2))


@pytest.mark.parametrize("plan, head_groups", VARIANTS, ids=[_name(*v) for v in VARIANTS])
def test_fp8_plan_tracks_fp8_on_one_process(world_results, single, plan, head_groups):
    ranks = [r[_name(plan, head_groups)] for r in world_results[: plan.world_size]]
    latents = ranks[0]["latents"]
    # Every rank runs the same solver update on the same exchanged predictions.
    for other in ranks[1:]:
        assert torch.equal(other["latents"], latents)
    for rank in ranks:
        # Both experts' blocks ran, each as the one-pass FP8 block, its 7 linear layers all FP8 (with tp the three
        # row-parallel ones, both attention outputs and the FFN output, as such).
        assert rank["blocks"] == 2 * 2
        assert rank.get("one_pass_blocks") == rank["blocks"]
        assert rank.get("fp8_layers") == 7 * rank["blocks"]
        assert rank.get("row_parallel", 0) == (3 * rank["blocks"] if plan.tp > 1 else 0)
    rel = rel_l2(latents, single)
    print(f"{_name(plan, head_groups)}: fp8 latents against fp8 on one process, relative L2 {rel:.2e}")
    assert torch.isfinite(latents).all()
    # cfg and ulysses give each token and each head the same scales as one process (per token; per (batch, head)
    # over the whole sequence after the exchange): at most the summation order differs (measured: identical here).
    # tp scales the row-parallel layers' weights and inputs over a rank's share of the features: another e4m3
    # rounding (measured 1.0e-2 here), well inside FP8's own error against fp32 (about 4e-2 a layer,
    # benchmarks/RESULTS.md, Precision) and far from what a wrong scale gives (order 1).
    assert rel < (3e-2 if plan.tp > 1 else 1e-3), rel
