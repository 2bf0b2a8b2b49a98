"""GPU-only checks of the served denoiser configuration; skipped where no CUDA device is present (CPU CI).

The full-size measurements live in benchmarks/ (denoiser_step.py, gpu_numerics.py, gpu_e2e.sh); these keep the
GPU code paths under test on any GPU host: `python -m pytest tests/gpu`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from factories import GPU_REQUEST as REQUEST
from factories import make_embeds
from wan_triton.components import build_denoiser
from wan_triton.config.deployment import ComponentConfig, EngineKind
from wan_triton.kernels import attention
from wan_triton.model.checkpoint import Checkpoint


def _latents(ckpt: Checkpoint, cfg: ComponentConfig, embeds: torch.Tensor) -> torch.Tensor:
    tf32 = cfg.precision != "float32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    return build_denoiser(ckpt, cfg, Path("/nonexistent"))(REQUEST, embeds).float().cpu()


@pytest.mark.parametrize("attention", ["cudnn", "auto"])
@pytest.mark.parametrize("compile_blocks", [False, True])
def test_bf16_gpu_denoiser_tracks_fp32_reference(other_checkpoint, attention, compile_blocks):
    ckpt = Checkpoint.open(other_checkpoint)
    embeds = make_embeds(ckpt.text_dim)
    reference = _latents(ckpt, ComponentConfig(engine=EngineKind.TORCH, device="cuda", attention="reference"), embeds)
    served = _latents(
        ckpt,
        ComponentConfig(
            engine=EngineKind.TORCH,
            device="cuda",
            precision="bfloat16",
            attention=attention,
            compile_blocks=compile_blocks,
        ),
        embeds,
    )
    rel_l2 = float((served - reference).norm() / reference.norm())
    assert torch.isfinite(served).all() and rel_l2 <= 2e-2, rel_l2


def _served(ckpt: Checkpoint, request=REQUEST, embeds=None, **options) -> tuple[torch.Tensor, object]:
    cfg = ComponentConfig(engine=EngineKind.TORCH, device="cuda", precision="bfloat16", attention="cudnn", **options)
    embeds = make_embeds(ckpt.text_dim) if embeds is None else embeds
    denoiser = build_denoiser(ckpt, cfg, Path("/nonexistent"))
    return denoiser(request, embeds).float().cpu(), denoiser


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_cuda_graph_replay_is_bit_identical_to_eager(other_checkpoint, compile_blocks):
    ckpt = Checkpoint.open(other_checkpoint)
    eager, _ = _served(ckpt, compile_blocks=compile_blocks, expert_residency="resident")
    graphed, denoiser = _served(ckpt, compile_blocks=compile_blocks, expert_residency="resident", cuda_graphs=True)
    engines = list(denoiser.experts.values())
    assert all(any(g is not None for g in e.graphs.values()) for e in engines), "no graph was captured"
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_unguided_requests_run_and_capture_the_experts_at_batch_1(other_checkpoint, compile_blocks):
    """Guidance 1.0 on both experts (the 4-step distill mode): no unconditional branch, so every expert call, and
    every graph captured for it, is batch 1; the replay equals eager."""
    ckpt = Checkpoint.open(other_checkpoint)
    request = replace(REQUEST, guidance_scale=1.0, guidance_scale_2=1.0)
    embeds = make_embeds(ckpt.text_dim, rows=1)
    options = dict(compile_blocks=compile_blocks, expert_residency="resident")
    eager, _ = _served(ckpt, request=request, embeds=embeds, **options)
    graphed, denoiser = _served(ckpt, request=request, embeds=embeds, cuda_graphs=True, **options)
    captured = [key for e in denoiser.experts.values() for key, graph in e.graphs.items() if graph is not None]
    assert captured, "no graph was captured"
    assert all(dict((name, shape) for name, shape, _, _ in key)["hidden_states"][0] == 1 for key in captured)
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_swapped_experts_on_gpu_match_resident(other_checkpoint, cuda_graphs):
    ckpt = Checkpoint.open(other_checkpoint)
    resident, _ = _served(ckpt, expert_residency="resident", cuda_graphs=cuda_graphs)
    swapped, denoiser = _served(ckpt, expert_residency="swap", cuda_graphs=cuda_graphs)
    assert torch.equal(swapped, resident)
    assert denoiser.swapper.swaps_overlapped == 2 and denoiser.swapper.swaps_blocking == 0


@pytest.mark.skipif(
    not (attention.flash4_available() and torch.cuda.get_device_capability()[0] == 9),
    reason="needs FlashAttention-4 on a Hopper GPU",
)
def test_flash4_wide_query_tile_is_bit_identical_to_the_default():
    """The served flash4 op picks 192-row query tiles above WIDE_Q_TILE_MIN_ROWS; the key tile is unchanged, so its
    output must equal FlashAttention-4's default tile exactly (and both must be attention: checked against SDPA)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.interface import _flash_attn_fwd

    batch, seqlen, heads = 1, 20_000, 40  # 800k query rows: over the threshold
    assert attention.use_wide_q_tile(batch, seqlen, heads, seqlen, 128, torch.cuda.get_device_capability())
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (
        torch.randn(batch, seqlen, heads, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "qkv"
    )
    served = attention.attention_fn(attention.AttentionBackend.FLASH4)(q, k, v)
    default = flash_attn_func(q, k, v, causal=False)
    default = default[0] if isinstance(default, tuple) else default
    wide = _flash_attn_fwd(q, k, v, causal=False, **attention.WIDE_Q_TILE)[0]
    assert torch.equal(wide, default)
    assert torch.equal(served, wide)
    reference = attention.attention_fn(attention.AttentionBackend.CUDNN)(q, k, v).float()
    assert float((served.float() - reference).norm() / reference.norm()) < 1e-2
    # Below the threshold the served op calls the forward entry point with the default tile: as flash_attn_func.
    small = [t[:, :4096, :8].contiguous() for t in (q, k, v)]
    assert not attention.use_wide_q_tile(1, 4096, 8, 4096, 128, torch.cuda.get_device_capability())
    default = flash_attn_func(*small, causal=False)
    default = default[0] if isinstance(default, tuple) else default
    assert torch.equal(attention.attention_fn(attention.AttentionBackend.FLASH4)(*small), default)


@pytest.mark.parametrize("backend", ["cudnn", "flash4", "flash3"])
def test_served_kernels_on_a_head_size_128_expert_track_fp32_compiled_and_graphed(backend):
    """The tiny test checkpoints have 8-channel heads, which only cuDNN takes; this 2-layer expert has the A14B head
    size, so the FlashAttention kernels run inside the served path: attention.install, compiled blocks, a CUDA graph
    (bit-identical to eager), against diffusers' processor in fp32 (relative L2 within the bf16 tolerance above)."""
    if backend != "cudnn" and not attention._available(attention.AttentionBackend(backend)):
        pytest.skip(f"{backend} is not installed on this GPU host")
    from diffusers import WanTransformer3DModel

    from wan_triton.runtime.experts import compile_expert_blocks, torch_engines

    config = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True, rope_max_seq_len=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    reference_model = WanTransformer3DModel(**config).cuda().eval()
    served_model = WanTransformer3DModel(**config).to("cuda", torch.bfloat16).eval()
    served_model.load_state_dict(reference_model.state_dict())
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
            exact = reference_model(**inputs, return_dict=False)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved

    assert attention.install(served_model, backend, torch.device("cuda")) == attention.AttentionBackend(backend)
    compile_expert_blocks(served_model, parallel=False)
    eager, graphed = torch_engines(served_model, torch.device("cuda"), torch.bfloat16, cuda_graphs=True)
    out_eager = eager.run(inputs)["noise_pred"].float()
    graphed.run(inputs)  # capture
    assert graphed.graphs and all(g is not None for g in graphed.graphs.values()), "the forward was not captured"
    out_graphed = graphed.run(inputs)["noise_pred"].float()
    assert torch.equal(out_graphed, out_eager)
    rel_l2 = float((out_eager - exact).norm() / exact.norm())
    assert torch.isfinite(out_eager).all() and rel_l2 <= 2e-2, rel_l2


def _fp32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return (scores.softmax(-1) @ v).transpose(1, 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not attention.flash3_available(), reason="needs FlashAttention-3 (fa3-fwd) on a Hopper GPU")
def test_flash3_is_attention_as_accurate_as_the_other_kernels_and_replays_in_a_graph():
    """The served flash3 op against fp32 attention, beside cuDNN (and FlashAttention-4 where installed): V strided as
    the fused QKV projection leaves it, self- and cross-attention lengths. Captured in a CUDA graph it replays the
    eager output bit for bit (the parallel ranks capture their forwards)."""
    flash3 = attention.attention_fn(attention.AttentionBackend.FLASH3)
    others = [attention.AttentionBackend.CUDNN]
    if attention.flash4_available():
        others.append(attention.AttentionBackend.FLASH4)
    gen = torch.Generator("cuda").manual_seed(0)
    for seq_k in (6000, 512):
        q = torch.randn(2, 6000, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        kv = torch.randn(2, seq_k, 2 * 8 * 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (t.unflatten(-1, (8, 128)) for t in kv.chunk(2, dim=-1))  # strided in the sequence, as served
        assert not v.is_contiguous()
        exact = _fp32_attention(q, k, v)

        def rel(out: torch.Tensor, exact: torch.Tensor = exact) -> float:
            return float((out.float() - exact).norm() / exact.norm())

        served = flash3(q, k, v)
        errors = {backend.value: rel(attention.attention_fn(backend)(q, k, v)) for backend in others}
        assert rel(served) < 1e-2, (rel(served), errors)
        assert rel(served) <= 1.5 * min(errors.values()), (rel(served), errors)

        static = [t.clone() for t in (q, k, v)]
        out = flash3(*static)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flash3(*static)
        for t, new in zip(static, (q.flip(1), k, v), strict=True):
            t.copy_(new)
        graph.replay()
        assert torch.equal(out, flash3(q.flip(1), k, v))


def test_ffn_epilogue_applies_the_tanh_gelu_and_rounds_once():
    """cuBLASLt's GELU epilogue must be the tanh approximation Wan uses (ATen's CPU op of the same name applies the
    exact GELU; the two differ by up to 4.7e-4, far above an fp32 GEMM's error), and in bf16 the one rounding after
    the epilogue must be no less accurate than diffusers' projection, rounding, GELU, rounding."""
    import torch.nn.functional as F

    from wan_triton.kernels.ffn import linear_gelu_tanh

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gen = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(4096, 256, device="cuda", generator=gen)
        w = torch.randn(512, 256, device="cuda", generator=gen) * 0.15  # pre-activations of std ~2.4
        b = torch.randn(512, device="cuda", generator=gen)
        pre = F.linear(x, w, b)
        fused = linear_gelu_tanh(x, w, b)
        assert (fused - F.gelu(pre, approximate="tanh")).abs().max() < 2e-5
        assert (fused - F.gelu(pre)).abs().max() > 2e-4

        xb, wb, bb = (t.to(torch.bfloat16) for t in (x, w, b))
        exact = F.gelu(F.linear(xb.double(), wb.double(), bb.double()), approximate="tanh")
        unfused = F.gelu(F.linear(xb, wb, bb), approximate="tanh")

        def rel(t: torch.Tensor) -> float:
            return float((t.double() - exact).norm() / exact.norm())

        assert rel(linear_gelu_tanh(xb, wb, bb)) <= rel(unfused)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
