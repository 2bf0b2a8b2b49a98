"""`precision: fp8` on CPU (wan_triton.kernels.fp8): quantization round trips and scale layouts, the FP8 layers'
reference math (dequantize, then fp32 products: what the CUDA kernels compute up to their own rounding), the expert
rewrite, and the config checks. tests/gpu/test_fp8_gpu.py checks the kernels themselves on a Hopper GPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers.models.attention import FeedForward
from pydantic import ValidationError

from factories import load_deployment
from wan_triton.config.deployment import ComponentConfig, Deployment, EngineKind
from wan_triton.kernels import attention, fp8, fp8_heads

# One e4m3 value is within 2^-4 of its input, relative (3 mantissa bits, round to nearest), above the subnormals.
E4M3_STEP = 2.0**-4


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _forward(expert) -> torch.Tensor:
    """factories.expert_forward's inputs in the expert's dtype."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 12, generator=gen).to(expert.dtype)
    text = torch.randn(2, 512, expert.config.text_dim, generator=gen).to(expert.dtype)
    with torch.no_grad():
        return expert(x, torch.tensor([900, 400]), text, return_dict=False)[0].float()


def test_weight_quantization_scales_each_output_channel_to_the_e4m3_range():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=gen) * torch.logspace(-6, 1, 48)[:, None]  # rows 7 decades apart
    w8, scale = fp8.quantize_weight(weight.to(torch.bfloat16))
    assert w8.dtype == fp8.E4M3 and w8.shape == (48, 64) and scale.dtype == torch.float32 and scale.shape == (48,)
    # Each row's largest magnitude lands on e4m3's largest value, so every row uses the whole range.
    assert torch.equal(w8.float().abs().amax(dim=1), torch.full((48,), fp8.E4M3_MAX))
    back = w8.float() * scale[:, None]
    assert ((back - weight.to(torch.bfloat16).float()).abs() <= E4M3_STEP * weight.abs().amax(1, keepdim=True)).all()
    assert _rel_l2(back, weight) < 3e-2  # per-channel scales: the small rows keep their precision
    per_tensor = (weight / (weight.abs().amax() / fp8.E4M3_MAX)).to(fp8.E4M3).float() * (
        weight.abs().amax() / fp8.E4M3_MAX
    )
    assert _rel_l2(back[:12], weight[:12]) < _rel_l2(per_tensor[:12], weight[:12]) / 5


def test_row_and_head_scales_have_the_layouts_the_kernels_take():
    x = torch.randn(10, 32)
    x[3] = 0  # an all-zero token keeps a finite scale and quantizes to zeros
    x8, xs = fp8.quantize_rows(x)
    assert xs.shape == (10, 1) and torch.isfinite(1 / xs).all() and torch.equal(x8[3].float(), torch.zeros(32))
    assert _rel_l2(x8.float() * xs, x) < 3e-2
    q = torch.randn(2, 50, 3, 16) * torch.tensor([1.0, 10.0, 0.1])[None, None, :, None]
    q8, qs = fp8_heads.quantize_heads(q)
    assert qs.shape == (2, 3) and q8.shape == q.shape  # FlashAttention-3's descale layout: (batch, heads)
    torch.testing.assert_close(qs, q.abs().amax(dim=(1, 3)) / fp8.E4M3_MAX)
    assert _rel_l2(q8.float() * qs[:, None, :, None], q) < 3e-2


def test_key_smoothing_leaves_attention_unchanged_and_shrinks_the_key_range():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    k = k + 5.0 * torch.randn(2, 16, generator=gen, dtype=torch.float64)  # a per-channel offset
    smoothed = fp8_heads.smooth_keys(k)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))

    torch.testing.assert_close(sdpa(q, smoothed, v), sdpa(q, k, v), rtol=1e-10, atol=1e-10)
    assert smoothed.abs().amax() < k.abs().amax() / 2


def test_fp8_attention_reference_tracks_fp32_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 2, 32, generator=gen) for _ in range(3))
    k = k + 3.0 * torch.randn(2, 32, generator=gen)
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    bf16 = [t.to(torch.bfloat16) for t in (q, k, v)]
    smoothed, plain = fp8.fp8_attention(*bf16, smooth_k=True), fp8.fp8_attention(*bf16, smooth_k=False)
    assert smoothed.dtype == torch.bfloat16 and smoothed.shape == q.shape
    # The CPU path quantizes Q, K and V as the kernel does; K smoothing keeps K's e4m3 steps small.
    assert _rel_l2(smoothed, exact) < 5e-2
    assert _rel_l2(smoothed, exact) < _rel_l2(plain, exact)


def test_fp8_linear_is_the_dequantized_fp32_product():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    layer = fp8.Fp8Linear.from_linear(linear)
    x = torch.randn(3, 5, 64, generator=gen).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 32)
    x8, xs = fp8.quantize_rows(x.reshape(-1, 64))
    expected = (x8.float() * xs) @ (layer.weight.float() * layer.weight_scale[:, None]).t()
    # The bias joins the fp32 product before the one rounding, as the GEMM's epilogue adds it on CUDA.
    torch.testing.assert_close(out, (expected + linear.bias.float()).to(torch.bfloat16).view(3, 5, 32))
    assert _rel_l2(out, linear(x)) < 6e-2
    assert [n for n, _ in layer.named_parameters()] == ["weight", "weight_scale", "bias"]


def _expert():
    """A 2-block Wan expert whose linear sizes are multiples of 16 (FP8 GEMMs need them)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64,
    ).eval()  # fmt: skip


def test_quantized_expert_tracks_the_bf16_expert_and_halves_the_block_weights():
    reference = _expert()
    exact = _forward(reference)
    served = copy.deepcopy(reference).to(torch.bfloat16)
    attention.install(served, "cudnn", torch.device("cpu"))  # fused projections and the served processor
    served.set_attn_processor(fp8.Fp8AttnProcessor(attention.attention_fn(attention.AttentionBackend.REFERENCE)))
    bf16_bytes = sum(p.numel() * p.element_size() for p in served.blocks.parameters())
    bf16_out = _forward(served)
    assert fp8.quantize_module(served) == len(fp8.FP8_BLOCK_LINEARS) * len(served.blocks)
    assert fp8.quantize_module(served) == 0  # already quantized
    for block in served.blocks:
        assert type(block.attn1.to_qkv) is fp8.Fp8Linear and type(block.ffn.net[2]) is fp8.Fp8Linear
        assert type(block.attn2.to_kv) is fp8.Fp8Linear
        assert type(block.ffn) is FeedForward  # the bf16 GELU-epilogue op is not used on FP8 weights
    quantized = [m for m in served.blocks.modules() if type(m) is fp8.Fp8Linear]
    assert all(m.weight.element_size() == 1 for m in quantized)
    saved = sum(m.weight.numel() - 4 * m.weight_scale.numel() for m in quantized)  # one byte a weight, fp32 scales
    assert sum(p.numel() * p.element_size() for p in served.blocks.parameters()) == bf16_bytes - saved
    out = _forward(served)
    assert torch.isfinite(out).all()
    assert _rel_l2(bf16_out, exact) < _rel_l2(out, exact) < 8e-2


def test_fp8_blocks_take_their_inputs_quantized_in_one_pass_with_the_same_result():
    # Off CUDA the one-pass ops run their torch reference: the math of diffusers' block followed by each layer's own
    # per-token quantization, so the output is bit-identical; the Triton kernels' rounding against that reference is
    # checked on the GPU (tests/gpu/test_fp8_gpu.py).
    served = _expert().to(torch.bfloat16)
    attention.install(served, "cudnn", torch.device("cpu"))
    served.set_attn_processor(fp8.Fp8AttnProcessor(attention.attention_fn(attention.AttentionBackend.REFERENCE)))
    fp8.quantize_module(served)
    per_layer = _forward(served)
    assert fp8.install_blocks(served) == len(served.blocks)
    assert all(type(block) is fp8.Fp8TransformerBlock for block in served.blocks)
    assert "Fp8TransformerBlock" in served._repeated_blocks  # compile_repeated_blocks finds them by class name
    assert torch.equal(_forward(served), per_layer)


@pytest.mark.parametrize("kernels", [False, True])
def test_fp8_blocks_trace_whole_through_the_quantizing_ops(kernels, monkeypatch):
    # Each quantizing op (fp8_rows, fp8_heads) is a custom op with a fake implementation, so that torch.compile traces
    # a block in one graph (fullgraph, as compile_repeated_blocks does) with the op opaque inside; aot_eager runs that
    # graph's ops eagerly, the same ops as without compile. With the attention quantization kernels or without.
    monkeypatch.setattr(fp8, "_quantize_kernels", kernels)
    served = _expert().to(torch.bfloat16)
    attention.install(served, "cudnn", torch.device("cpu"))
    served.set_attn_processor(fp8.Fp8AttnProcessor(attention.attention_fn(attention.AttentionBackend.REFERENCE)))
    fp8.quantize_module(served)
    fp8.install_blocks(served)
    eager = _forward(served)
    torch._dynamo.reset()
    served.compile_repeated_blocks(fullgraph=True, dynamic=False, backend="aot_eager")
    try:
        assert torch.equal(_forward(served), eager)
    finally:
        torch._dynamo.reset()


def test_fp8_blocks_need_every_block_layer_in_fp8():
    served = _expert().to(torch.bfloat16)
    attention.install(served, "cudnn", torch.device("cpu"))
    assert fp8.install_blocks(served) == 0  # bf16 layers: nothing hands them quantized rows


def test_quantize_module_refuses_sizes_fp8_gemms_cannot_take(other_checkpoint):
    from wan_triton.model.checkpoint import Checkpoint

    expert = Checkpoint.open(other_checkpoint).load_transformer("transformer", torch.bfloat16)
    attention.fuse_projections(expert)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.quantize_module(expert)


def test_fp8_is_refused_off_hopper_at_install():
    with pytest.raises(ValueError, match="CUDA device"):
        fp8.install(_expert().to(torch.bfloat16), "auto", torch.device("cpu"))


def test_fp8_config_is_a_denoiser_torch_cuda_setting():
    ok = ComponentConfig(engine=EngineKind.TORCH, device="cuda", precision="fp8")
    assert ok.precision == "fp8"
    # With a parallel plan too (tests/multiprocess/test_fp8_parallel.py runs the plans).
    assert ComponentConfig(engine=EngineKind.TORCH, device="cuda", precision="fp8", parallel={"cfg": 2, "tp": 2})
    with pytest.raises(ValidationError, match="engine: torch and device: cuda"):
        ComponentConfig(engine=EngineKind.TORCH, device="cpu", precision="fp8")
    with pytest.raises(ValidationError, match="engine: torch and device: cuda"):
        ComponentConfig(engine=EngineKind.ONNXRUNTIME, device="cuda", precision="fp8")
    with pytest.raises(ValidationError, match="precision"):
        ComponentConfig(engine=EngineKind.TORCH, device="cuda", precision="fp4")
    data = load_deployment("gpu_a14b").model_dump()
    data["components"]["vae_decoder"]["precision"] = "fp8"
    with pytest.raises(ValidationError, match="vae_decoder: precision fp8 is a denoiser setting"):
        Deployment.model_validate(data)


def test_shipped_fp8_deployment_differs_from_gpu_a14b_in_the_denoiser_precision_and_residency_only():
    base, fp8_deployment = load_deployment("gpu_a14b"), load_deployment("gpu_a14b_fp8")
    assert fp8_deployment.components.denoiser.precision == "fp8"
    assert fp8_deployment.components.denoiser.expert_residency == "auto"
    changed = fp8_deployment.model_dump()
    for key in ("precision", "expert_residency"):
        changed["components"]["denoiser"][key] = getattr(base.components.denoiser, key)
    assert changed == base.model_dump()


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """A tiny checkpoint with real (seeded) safetensors weights whose linear sizes FP8 takes."""
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    config = TinyConfig(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, seed=5)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_fp8", config)


def _served_layout(ckpt):
    expert = ckpt.load_transformer("transformer", torch.bfloat16)
    attention.install(expert, "cudnn", torch.device("cpu"))
    return expert


def test_build_time_fp8_weights_are_the_load_time_quantization_with_a_manifest(fp8_checkpoint, tmp_path):
    import json

    from wan_triton.model.checkpoint import Checkpoint
    from wan_triton.runtime import fp8_weights

    ckpt = Checkpoint.open(fp8_checkpoint)
    assert fp8_weights.find_fp8_weights(tmp_path, ckpt) is None  # nothing built: quantize at load
    folder = fp8_weights.write_fp8_weights(ckpt, tmp_path / fp8_weights.FOLDER)
    manifest = json.loads((folder / fp8_weights.MANIFEST).read_text())
    assert manifest["precision"] == "fp8" and manifest["weight_dtype"] == "float8_e4m3fn"
    assert manifest["scale_method"] == fp8.SCALE_METHOD and manifest["layers"] == list(fp8.FP8_BLOCK_LINEARS)
    assert set(manifest["experts"]) == {"transformer", "transformer_2"}
    assert fp8_weights.find_fp8_weights(tmp_path, ckpt) == folder

    at_load, from_build = _served_layout(ckpt), _served_layout(ckpt)
    fp8.quantize_module(at_load)
    stored = fp8_weights.stored_weights(folder, "transformer", torch.device("cpu"))
    assert fp8.quantize_module(from_build, stored=stored) == len(fp8.FP8_BLOCK_LINEARS) * len(from_build.blocks)
    loaded, built = dict(at_load.named_parameters()), dict(from_build.named_parameters())
    assert loaded.keys() == built.keys()
    for name, value in loaded.items():
        assert value.dtype == built[name].dtype and torch.equal(value.float(), built[name].float()), name


def test_build_time_fp8_weights_of_other_weights_are_refused(fp8_checkpoint, tmp_path):
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint
    from wan_triton.model.checkpoint import Checkpoint
    from wan_triton.runtime import fp8_weights

    folder = fp8_weights.write_fp8_weights(Checkpoint.open(fp8_checkpoint), tmp_path / fp8_weights.FOLDER)
    other = make_tiny_checkpoint(
        tmp_path / "other",
        TinyConfig(num_attention_heads=2, attention_head_dim=16, ffn_dim=96, text_dim=32, seed=5),
    )
    # The load checks tp_shards' cheap fingerprint (config, file sizes and headers); the build records a full SHA-256.
    with pytest.raises(ValueError, match="quantized from other weights"):
        fp8_weights.read_manifest(folder, Checkpoint.open(other))


def test_make_build_writes_and_renders_the_fp8_weights_for_an_fp8_deployment(fp8_checkpoint, tmp_path):
    from wan_build.__main__ import main as build_main
    from wan_triton.runtime import fp8_weights

    repo = tmp_path / "repo"
    deployment = "model_repository/deployments/gpu_a14b_fp8.yaml"
    args = ["--model", str(fp8_checkpoint), "--deployment", deployment, "--repo", str(repo)]
    assert build_main([*args, "--artifacts-root", str(tmp_path / "artifacts")]) == 0
    rendered = list(repo.glob(f"*/1/{fp8_weights.FOLDER}/{fp8_weights.MANIFEST}"))
    assert len(rendered) == 1 and rendered[0].parts[-4].endswith("_scheduler")
    assert (rendered[0].parent / "transformer_2.safetensors").is_file()


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """The served FP8 path on CPU (factories.use_fp8_on_cpu), undone after the test."""
    from factories import use_fp8_on_cpu

    use_fp8_on_cpu(monkeypatch.setattr)


def _fp8_latents(ckpt, residency: str, fp8_folder=None) -> tuple[torch.Tensor, object]:
    from factories import fp8_cpu_denoiser, make_embeds, make_request

    denoiser = fp8_cpu_denoiser(ckpt, residency, fp8_folder)
    return denoiser(make_request(), make_embeds(ckpt.text_dim)).float(), denoiser


def test_fp8_experts_swap_and_load_build_time_weights_as_resident_ones(fp8_checkpoint, fp8_on_cpu, tmp_path):
    from wan_triton.model.checkpoint import Checkpoint
    from wan_triton.runtime import fp8_weights

    ckpt = Checkpoint.open(fp8_checkpoint)
    resident, _ = _fp8_latents(ckpt, "resident")
    swapped, denoiser = _fp8_latents(ckpt, "swap")
    assert torch.isfinite(resident).all()
    assert torch.equal(swapped, resident)
    assert denoiser.swapper.swaps_overlapped + denoiser.swapper.swaps_blocking >= 1  # the request crossed the switch
    qkv = [p for n, p in denoiser.swapper.module.named_parameters() if n.endswith("attn1.to_qkv.weight")]
    assert qkv and all(p.dtype == fp8.E4M3 for p in qkv)

    folder = fp8_weights.write_fp8_weights(ckpt, tmp_path / fp8_weights.FOLDER)
    for residency in ("resident", "swap"):
        stored, _ = _fp8_latents(ckpt, residency, folder)
        assert torch.equal(stored, resident), residency


def test_fp8_build_with_tp_writes_bf16_shards_not_whole_layer_fp8_weights(fp8_checkpoint, tmp_path):
    import yaml

    from wan_build.__main__ import main as build_main
    from wan_triton.runtime import fp8_weights

    data = yaml.safe_load(Path("model_repository/deployments/gpu_a14b_fp8.yaml").read_text())
    data["components"]["denoiser"]["parallel"] = {"tp": 2}
    deployment = tmp_path / "fp8_tp2.yaml"
    deployment.write_text(yaml.safe_dump(data))
    repo = tmp_path / "repo"
    args = ["--model", str(fp8_checkpoint), "--deployment", str(deployment), "--repo", str(repo)]
    assert build_main([*args, "--artifacts-root", str(tmp_path / "artifacts")]) == 0
    # Each tp rank quantizes its own bf16 shard at load (parallel.sharding.install_fp8).
    assert len(list(repo.glob("*/1/tp2-fp8/manifest.json"))) == 1
    assert not list(repo.glob(f"*/1/{fp8_weights.FOLDER}"))
