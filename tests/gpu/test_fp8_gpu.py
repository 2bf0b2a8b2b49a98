"""`precision: fp8` on a Hopper GPU (wan_triton.kernels.fp8): each FP8 part against bf16 and fp32 with stated
bounds, and the served path (compiled blocks, a CUDA graph) replaying bit-identically. Skipped without CUDA (the tier's
marker) and off SM90 or without FlashAttention-3's fa3-fwd build here.

Bounds: FP8 e4m3 keeps 3 mantissa bits, so one quantized operand is off by up to 2^-4 relative and a product of two
by about 3-4e-2 relative L2 on random data (benchmarks/RESULTS.md, Precision); bf16 is about 20x closer. The bounds
below sit above the measured errors with margin and well below what a broken scale (a factor off, a wrong axis)
gives, which is O(1).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from wan_triton.kernels import attention, fp8

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or fp8.supported(torch.device("cuda")) is not None,
    reason="needs a Hopper GPU with fa3-fwd (precision fp8)",
)


# FP8 attention against fp32 on random inputs measured 5.4e-2 relative L2 (bf16: 2.3e-3), the same with one scale per
# tensor or per (batch, head): the kernel's rounding of the softmax probabilities to e4m3 dominates, not the Q/K/V
# scales (benchmarks/RESULTS.md, Precision).
ATTENTION_BOUND = 8e-2


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_fp8_linear_tracks_fp32_and_its_cpu_reference():
    gen = torch.Generator("cuda").manual_seed(0)
    linear = torch.nn.Linear(512, 768, device="cuda")
    torch.nn.init.normal_(linear.weight, std=0.02, generator=gen)
    x = torch.randn(3, 1000, 512, device="cuda", generator=gen)
    exact = linear(x)
    lin_bf16 = linear.to(torch.bfloat16)
    layer = fp8.Fp8Linear.from_linear(lin_bf16)
    assert layer.weight.dtype == fp8.E4M3 and layer.weight_scale.shape == (768,)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 1000, 768)
    bf16_err, fp8_err = _rel_l2(lin_bf16(x.to(torch.bfloat16)), exact), _rel_l2(out, exact)
    assert fp8_err <= 6e-2, fp8_err
    assert bf16_err < fp8_err, (bf16_err, fp8_err)
    # The tensor-core product equals the dequantized fp32 product of the same operands up to bf16 output rounding.
    x8, xs = fp8.quantize_rows(x.to(torch.bfloat16).reshape(-1, 512))
    emulated = (x8.float() * xs) @ (layer.weight.float() * layer.weight_scale[:, None]).t() + layer.bias.float()
    assert _rel_l2(out.reshape(-1, 768), emulated) <= 4e-3


@pytest.mark.parametrize("tokens", [4096, 16_384])
def test_fp8_attention_tracks_fp32_within_bound_and_smoothing_helps(tokens):
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, tokens, 8, 128, device="cuda", generator=gen) for _ in range(3))
    k = k + 2.0 * torch.randn(8, 128, device="cuda", generator=gen)  # a per-channel key offset, as trained K has
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    exact = exact.transpose(1, 2)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    bf16 = attention.attention_fn(attention.AttentionBackend.FLASH3)(q, k, v)
    smoothed = fp8.fp8_attention(q, k, v, smooth_k=True)
    plain = fp8.fp8_attention(q, k, v, smooth_k=False)
    assert smoothed.dtype == torch.bfloat16 and smoothed.shape == q.shape
    bf16_err, smoothed_err, plain_err = (_rel_l2(o, exact) for o in (bf16, smoothed, plain))
    assert smoothed_err <= ATTENTION_BOUND, (smoothed_err, bf16_err)
    assert smoothed_err <= plain_err, (smoothed_err, plain_err)
    assert bf16_err < smoothed_err


def _head128_model(dtype):
    from diffusers import WanTransformer3DModel

    config = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True, rope_max_seq_len=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    return WanTransformer3DModel(**config).to("cuda", dtype).eval()


@pytest.mark.parametrize("kernels", [False, True], ids=["compiled-quantization", "quantization-kernels"])
def test_fp8_expert_tracks_fp32_compiled_and_graph_replays_bit_identically(kernels, monkeypatch):
    """A 2-layer expert with the A14B head size through the served path (fp8.install, compiled blocks, a CUDA graph),
    the attention operands and outputs quantized by compiled torch ops or by their kernels (`use_quantize_kernels`):
    bit-identical replay, output against fp32 within the FP8 bound and bf16 closer."""
    from wan_triton.runtime.experts import compile_expert_blocks, torch_engines

    monkeypatch.setattr(fp8, "_quantize_kernels", kernels)

    reference = _head128_model(torch.float32)
    bf16_model = _head128_model(torch.bfloat16)
    bf16_model.load_state_dict(reference.state_dict())
    fp8_model = _head128_model(torch.bfloat16)
    fp8_model.load_state_dict(reference.state_dict())
    gen = torch.Generator("cuda").manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 16, 5, 32, 48, device="cuda", generator=gen),  # 1,920 tokens
        "timestep": torch.tensor([900, 900], device="cuda"),
        "encoder_hidden_states": torch.randn(2, 512, 64, device="cuda", generator=gen),
    }
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            exact = reference(**inputs, return_dict=False)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved

    bf16_weights = sum(p.numel() * p.element_size() for p in bf16_model.blocks.parameters())
    attention.install(bf16_model, "flash3", torch.device("cuda"))
    fp8.install(fp8_model, "flash3", torch.device("cuda"))
    fp8_weights = sum(p.numel() * p.element_size() for p in fp8_model.blocks.parameters())
    assert fp8_weights < 0.6 * bf16_weights, (fp8_weights, bf16_weights)
    compile_expert_blocks(fp8_model, parallel=False)
    eager, graphed = torch_engines(fp8_model, torch.device("cuda"), torch.bfloat16, cuda_graphs=True)
    out_eager = eager.run(inputs)["noise_pred"].float()
    graphed.run(inputs)  # capture
    assert graphed.graphs and all(g is not None for g in graphed.graphs.values()), "the forward was not captured"
    assert torch.equal(graphed.run(inputs)["noise_pred"].float(), out_eager)
    with torch.inference_mode():
        out_bf16 = bf16_model(**{n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in inputs.items()},
                              return_dict=False)[0]  # fmt: skip
    fp8_err, bf16_err = _rel_l2(out_eager, exact), _rel_l2(out_bf16, exact)
    assert torch.isfinite(out_eager).all() and fp8_err <= 8e-2, (fp8_err, bf16_err)
    assert bf16_err < fp8_err


def test_fp8_refuses_the_reference_attention():
    model = _head128_model(torch.bfloat16)
    with pytest.raises(ValueError, match="reference"):
        fp8.install(model, "reference", torch.device("cuda"))


@pytest.fixture(scope="module")
def head64_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose sizes FP8 takes: head size 64 (FlashAttention-3), widths in multiples of 16."""
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    config = TinyConfig(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, text_dim=64, seed=5)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_head64", config)


def _denoise(ckpt, **options) -> tuple[torch.Tensor, object]:
    from pathlib import Path

    from factories import GPU_REQUEST, make_embeds
    from wan_triton.components import build_denoiser
    from wan_triton.config.deployment import ComponentConfig, EngineKind

    cfg = ComponentConfig(engine=EngineKind.TORCH, device="cuda", **options)
    denoiser = build_denoiser(ckpt, cfg, Path("/nonexistent"))
    return denoiser(GPU_REQUEST, make_embeds(ckpt.text_dim)).float().cpu(), denoiser


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_fp8_denoiser_swaps_experts_and_replays_graphs_as_resident_eager(head64_checkpoint, cuda_graphs):
    """The served loop at precision fp8 (both experts, the switch): swapping the FP8 experts, with or without CUDA
    graphs, gives exactly the resident eager result (the same bytes reach the same kernels). Eager blocks keep the
    test short; compiled blocks under a graph are checked on the head-128 expert above."""
    from wan_triton.model.checkpoint import Checkpoint

    ckpt = Checkpoint.open(head64_checkpoint)
    common = dict(precision="fp8", attention="flash3")
    resident, _ = _denoise(ckpt, expert_residency="resident", **common)
    swapped, denoiser = _denoise(ckpt, expert_residency="swap", cuda_graphs=cuda_graphs, **common)
    assert torch.equal(swapped, resident)
    assert denoiser.swapper.swaps_overlapped == 2 and denoiser.swapper.swaps_blocking == 0
    host = denoiser.swapper.host_bytes
    _, bf16 = _denoise(ckpt, precision="bfloat16", attention="flash3", expert_residency="swap")
    # The block linear weights take 1 byte instead of 2; the embeddings and fp32 norms of this tiny model stay.
    assert host < 0.8 * bf16.swapper.host_bytes, (host, bf16.swapper.host_bytes)


def test_fp8_denoiser_tracks_the_fp32_run_and_bf16_closer(head64_checkpoint):
    from wan_triton.model.checkpoint import Checkpoint

    ckpt = Checkpoint.open(head64_checkpoint)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        exact, _ = _denoise(ckpt, precision="float32", attention="reference")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    served_fp8, _ = _denoise(ckpt, precision="fp8", attention="flash3")
    served_bf16, _ = _denoise(ckpt, precision="bfloat16", attention="flash3")
    fp8_err, bf16_err = _rel_l2(served_fp8, exact), _rel_l2(served_bf16, exact)
    # Final latents of the 8-step request: FP8's per-layer error (a few 1e-2) carried through both experts; the
    # bf16 run's bound in test_gpu.py is 2e-2.
    assert torch.isfinite(served_fp8).all() and fp8_err <= 1e-1, (fp8_err, bf16_err)
    assert bf16_err < fp8_err


def _codes_and_values_agree(ours, served, *, max_codes_differing: float) -> None:
    """Two per-token e4m3 quantizations of the same rows: the same scale up to a bf16 rounding or two of the row's amax,
    and each value within one e4m3 step of the other (2^-3 of the row's amax at most)."""
    (q, scale), (q_ref, scale_ref) = ours, served
    assert q.dtype == fp8.E4M3 and q.shape == q_ref.shape and scale.shape == scale_ref.shape
    assert torch.allclose(scale, scale_ref, rtol=2**-6, atol=0)
    differing = float((q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean())
    assert differing <= max_codes_differing, differing
    step = (q.float() * scale - q_ref.float() * scale_ref).abs().amax(-1) / (scale_ref[:, 0] * fp8.E4M3_MAX)
    assert float(step.max()) <= 2**-3, float(step.max())


# The block widths (model dim, FFN hidden) of a reduced model and of A14B; each launch the kernels have: the served
# one for the width, the whole row in registers, the row in chunks (a loop at run time; unrolled twice).
@pytest.mark.parametrize("dim, ffn_dim, rows", [(640, 1728, 777), (5120, 13824, 150)])
@pytest.mark.parametrize("launch", [None, "0x8", "512x4", "2048x8u2"])
def test_one_pass_quantization_kernels_match_the_torch_math(dim, ffn_dim, rows, launch):
    from wan_triton.kernels import fp8_rows, fp8_rows_triton

    launch = None if launch is None else fp8_rows_triton.Launch.parse(launch)
    gen = torch.Generator("cuda").manual_seed(0)
    eps = 1e-6
    # A residual stream far from zero mean, as a block's is: the variance must not cancel.
    hidden = (3 * torch.randn(2, rows, dim, device="cuda", generator=gen) + 40).to(torch.bfloat16)
    delta = torch.randn(2, rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
    mod_scale, mod_shift, gate = (0.1 * torch.randn(2, 1, dim, device="cuda", generator=gen) for _ in range(3))
    weight, bias = 1 + 0.1 * torch.randn(dim, device="cuda", generator=gen), torch.randn(dim, device="cuda") * 0.1

    _, *quantized = fp8_rows_triton.norm_quantize_rows(
        hidden, eps, mod_scale=mod_scale, mod_shift=mod_shift, launch=launch
    )
    served = fp8_rows.reference_norm(hidden, None, None, mod_scale, mod_shift, eps)
    _codes_and_values_agree(quantized, _flat(*served), max_codes_differing=0.02)

    summed, *quantized = fp8_rows_triton.norm_quantize_rows(
        hidden, eps, delta=delta, gate=gate, weight=weight, bias=bias, launch=launch
    )
    served_sum, *served = fp8_rows.reference_residual_norm(hidden, delta, gate, weight, bias, None, None, eps)
    assert torch.allclose(summed.float(), served_sum.float(), rtol=2**-7, atol=0)
    _codes_and_values_agree(quantized, _flat(*served), max_codes_differing=0.02)

    wide = torch.randn(2, rows, ffn_dim, device="cuda", generator=gen).to(torch.bfloat16)
    quantized = fp8_rows_triton.gelu_quantize_rows(wide, launch=launch)
    _codes_and_values_agree(quantized, _flat(*fp8_rows.reference_gelu(wide)), max_codes_differing=0.02)
    # Quantization alone takes the same bf16 values as the torch ops: the same codes exactly.
    plain = wide.reshape(-1, ffn_dim)
    _codes_and_values_agree(
        fp8_rows_triton.gelu_quantize_rows(plain, apply_gelu=False, launch=launch),
        fp8.quantize_rows(plain),
        max_codes_differing=0.0,
    )


def _per_head_rows(values: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, H, D] e4m3 with [B, H] scales as rows of one scale each: [B * H, S * D], [B * H, 1]."""
    return values.transpose(1, 2).reshape(scale.numel(), -1), scale.reshape(-1, 1)


@pytest.mark.parametrize("tokens", [1000, 4103])
@pytest.mark.parametrize("smooth_k", [True, False])
def test_attention_quantization_kernels_match_the_torch_math(tokens, smooth_k):
    from wan_triton.kernels import fp8_heads, fp8_heads_triton

    gen = torch.Generator("cuda").manual_seed(0)
    heads, head_dim = 6, 128
    # As a block hands them over: Q and K from the norms and rotary embedding (contiguous), V a slice of the fused
    # projection's output; K with a per-channel offset, which the smoothing takes out.
    qkv = torch.randn(2, tokens, 3 * heads * head_dim, device="cuda", generator=gen)
    qkv[..., heads * head_dim : 2 * heads * head_dim] += 4 * torch.randn(heads * head_dim, device="cuda", generator=gen)
    q, k, v = (t.unflatten(2, (heads, head_dim)) for t in qkv.to(torch.bfloat16).chunk(3, dim=-1))
    q, k = q.contiguous(), k.contiguous()
    ours = fp8_heads_triton.quantize_attention(q, k, v, smooth_k)
    served = fp8_heads.reference_quantize_attention(q, k, v, smooth_k)
    assert all(t.is_contiguous() and t.shape == q.shape for t in ours[:3])
    # Q and V (and K unsmoothed): the same amax and the same division, so the same codes exactly.
    exact = (0, 1, 2) if not smooth_k else (0, 2)
    for i in exact:
        assert torch.equal(ours[3 + i], served[3 + i]), i
        assert torch.equal(ours[i].view(torch.uint8), served[i].view(torch.uint8)), i
    if smooth_k:
        # K's mean sums in another order: a few codes one e4m3 step apart, the scale one bf16 rounding at most.
        _codes_and_values_agree(
            _per_head_rows(ours[1], ours[4]), _per_head_rows(served[1], served[4]), max_codes_differing=0.01
        )


def test_the_quantizing_ops_run_the_served_kernels():
    """What a block calls (the custom ops of fp8_rows, and after `fp8.use_quantize_kernels` fp8_rows.quantize and
    fp8_heads.quantize_attention) is what the kernel tests above check, bit for bit."""
    from wan_triton.kernels import fp8_heads, fp8_heads_triton, fp8_rows, fp8_rows_triton

    gen = torch.Generator("cuda").manual_seed(1)
    hidden, delta = (torch.randn(2, 300, 5120, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    mod_scale, mod_shift = (0.1 * torch.randn(2, 1, 5120, device="cuda", generator=gen) for _ in range(2))
    ffn = torch.randn(2, 300, 13824, device="cuda", generator=gen).to(torch.bfloat16)

    def same(ours, kernels):
        assert all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                   for a, b in zip(ours, kernels, strict=True))  # fmt: skip

    same(
        fp8_rows.norm_quantize(hidden, 1e-6, mod_scale=mod_scale, mod_shift=mod_shift),
        fp8_rows_triton.norm_quantize_rows(hidden, 1e-6, mod_scale=mod_scale, mod_shift=mod_shift)[1:],
    )
    summed, rows = fp8_rows.residual_norm_quantize(hidden, delta, 1e-6)
    same((summed, *rows), fp8_rows_triton.norm_quantize_rows(hidden, 1e-6, delta=delta))
    same(fp8_rows.gelu_quantize(ffn), fp8_rows_triton.gelu_quantize_rows(ffn))
    same(fp8_rows.quantize(hidden), fp8_rows_triton.gelu_quantize_rows(hidden, apply_gelu=False))
    q, k, v = (t.unflatten(2, (40, 128)) for t in (hidden, delta, ffn[..., :5120]))
    same(fp8_heads.quantize_attention(q, k, v), fp8_heads_triton.quantize_attention(q, k, v, True))


def _flat(values: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rows as the kernels return them: [M, K] values, [M, 1] scales."""
    return values.reshape(-1, values.shape[-1]), scale.reshape(-1, 1)


def _fp8_one_rank_plan(rank: int, checkpoint) -> dict:
    """In a one-rank NCCL world whose Ulysses and TP groups are that world: an expert parallelized and put in FP8 as
    a plan's rank does it (`parallel.sharding.install_fp8`: the row-parallel FP8 layers, FP8 self-attention in the
    sequence-parallel processor), compiled, under a CUDA graph; beside it the one-GPU FP8 expert of the same weights.
    Outputs for three inputs of one shape."""
    import torch.distributed as dist

    from wan_triton.config.plan import ParallelPlan
    from wan_triton.model.checkpoint import Checkpoint
    from wan_triton.parallel.process_groups import PlanGroups
    from wan_triton.parallel.sharding import install_fp8, parallelize, shard_tensor_parallel
    from wan_triton.parallel.tensor_parallel import Fp8RowParallelLinear
    from wan_triton.runtime.engines.cuda_graph import CudaGraphEngine
    from wan_triton.runtime.experts import compile_expert_blocks, torch_engines

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    ckpt = Checkpoint.open(checkpoint)
    world = dist.group.WORLD
    module = ckpt.load_transformer("transformer", torch.bfloat16, str(device))
    shard_tensor_parallel(module, 0, 1, world)
    module._wan_tp_sharded = True
    plan = ParallelPlan()
    groups = PlanGroups(plan, 0, plan.coords(0), None, world, world)
    install_fp8(module, groups, parallelize(module, groups, "flash3", device), device)
    compile_expert_blocks(module, parallel=True)
    eager, graphed = torch_engines(module, device, torch.bfloat16, cuda_graphs=True, parallel=True)
    assert isinstance(graphed, CudaGraphEngine) and not graphed.eager_fallback
    single = ckpt.load_transformer("transformer", torch.bfloat16, str(device))
    fp8.install(single, "flash3", device)
    one_gpu, _ = torch_engines(single, device, torch.bfloat16, cuda_graphs=False)

    gen = torch.Generator().manual_seed(1)
    outputs = []
    for _ in range(3):
        x = {
            "hidden_states": torch.randn(1, 16, 3, 8, 12, generator=gen).to(device),
            "timestep": torch.tensor([float(torch.randint(0, 1000, (1,), generator=gen))], device=device),
            "encoder_hidden_states": torch.randn(1, 512, ckpt.text_dim, generator=gen).to(device, torch.bfloat16),
        }
        outputs.append(tuple(e.run(x)["noise_pred"].float().cpu() for e in (graphed, eager, one_gpu)))
    row_parallel = sum(isinstance(m, Fp8RowParallelLinear) for m in module.modules())
    return {"outputs": outputs, "row_parallel": row_parallel, "blocks": len(module.blocks)}


def test_fp8_plan_rank_replays_its_graph_bit_identically_and_tracks_one_gpu(head64_checkpoint):
    """A parallel rank in FP8 on one GPU: the CUDA graph around its forward (NCCL collectives inside) replays
    bit-identically to eager, and its output tracks the one-GPU FP8 expert's (the row-parallel layers over one rank
    scale as the one-GPU layers do; the distributed q/k norms round differently: 3.9e-3 apart on CPU). Several GPUs:
    tests/multiprocess/test_fp8_parallel.py on CPU ranks."""
    from wan_triton.workers.world import run_world

    result = run_world(1, _fp8_one_rank_plan, (head64_checkpoint,), backend="nccl")[0]
    assert result["row_parallel"] == 3 * result["blocks"]
    for graphed, eager, one_gpu in result["outputs"]:
        assert torch.isfinite(eager).all()
        assert torch.equal(graphed, eager)
        assert _rel_l2(eager, one_gpu) < 2e-2, _rel_l2(eager, one_gpu)
    assert not torch.equal(result["outputs"][0][0], result["outputs"][1][0])  # the replays saw new inputs
