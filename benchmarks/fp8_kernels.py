"""FP8 kernels for the denoiser (`precision: fp8`, wan_triton.kernels.fp8) against bf16 at A14B shapes, one GPU.

  attention  FlashAttention-3's e4m3 forward with the scale variants (one scale per tensor; per (batch, head); per
             (batch, head) with K smoothed; and with V smoothed too) against the bf16 kernels (flash3, and flash4 or
             cuDNN where installed): TFLOP/s of the kernel alone, the cost of quantizing Q, K and V (the same math
             compiled from torch ops, as served, and as the Triton kernels of wan_triton.kernels.fp8_heads, with the
             share of e4m3 codes where the two differ), and the relative L2 error of the first 1,024 query rows
             against fp32 attention. Two input kinds: N(0, 1) q, k, v, and `offset` (q, k with a per-channel offset
             and scale as trained Q/K norms give, sharper scores).
  linear     each block linear layer's shape, compiled as it runs in a block (layer norm + modulation, then the
             projection): bf16 against `Fp8Linear` (quantizing its bf16 input per token), time and relative L2
             error against fp32.
  quant      the per-token activation quantization that feeds each FP8 linear layer, compiled from torch ops as
             the served block runs it against the one-pass Triton kernels of wan_triton.kernels.fp8_rows: norm +
             modulation (self-attention's input), residual add + affine norm (cross-attention's query; the FFN's
             input, a residual add + modulated norm, is timed as it), quantization alone (the attention outputs) and
             GELU (the FFN's hidden layer); beside them the bf16 norm + modulation that the bf16 block runs, and how
             far the two quantizations' e4m3 values differ. With --launches, each kernel at each launch too, and
             per row width the fastest launch whose codes agree with the torch ops' as the served launch's do
             (`quant_choice`, what denoiser_step.py --fp8-launches takes).
  block      one A14B transformer block (random weights), compiled: bf16 (served kernel) against fp8 (the one-pass
             quantization, as served) and fp8 per layer (each layer quantizing its bf16 input), time, and at
             480p the output error of each against the same block in fp32.
Random weights and inputs: error figures say how much the rounding moves the numbers, not how a video looks.

    python benchmarks/fp8_kernels.py --parts attention linear quant block --sizes 480p 720p --out $OUT/fp8_kernels.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wan_bench.experts import A14B_TRANSFORMER, SIZES, build_expert, tokens_of
from wan_bench.records import run_record, write_json
from wan_bench.timing import median_cuda
from wan_triton.kernels import attention, fp8, fp8_heads

logger = logging.getLogger("benchmarks.fp8_kernels")

HEADS, HEAD_DIM, DIM = 40, 128, 5120
ERROR_ROWS = 1024
SERVED_VARIANT = "fp8 per (batch, head), K smoothed"  # what wan_triton.kernels.fp8.fp8_attention runs
LINEAR_SHAPES = {"qkv": (5120, 15360), "out/cross_q": (5120, 5120), "ffn_in": (5120, 13824), "ffn_out": (13824, 5120)}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def fp32_attention_rows(q, k, v, rows: int) -> torch.Tensor:
    """fp32 attention of the first `rows` queries over all keys ([B, S, H, D] in and out)."""
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # fp32 without the S x S score matrix
        out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q[:, :rows], k, v)))
    return out.transpose(1, 2)


def attention_inputs(tokens: int, kind: str, batch: int = 2):
    gen = torch.Generator("cuda").manual_seed(0)
    shape = (batch, tokens, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen) for _ in range(3))
    if kind == "offset":
        # Trained Q/K norms scale channels unevenly and K carries a per-channel offset over all tokens.
        gain = 0.5 + 1.5 * torch.rand(HEADS, HEAD_DIM, device="cuda", generator=gen)
        offset = 2.0 * torch.randn(HEADS, HEAD_DIM, device="cuda", generator=gen)
        q, k = q * gain, k * gain + offset
    return (t.to(torch.bfloat16) for t in (q, k, v))


def fa3_fp8(q8, k8, v8, qs, ks, vs):
    return fp8._fa3_fp8()(q8, k8, v8, qs, ks, vs)


def attention_variants(q, k, v):
    """name -> (quantize: () -> operands, attend: operands -> out)."""
    b, h = q.shape[0], q.shape[2]

    def per_tensor():
        out = []
        for t in (q, k, v):
            s = t.float().abs().amax().clamp(min=fp8.MIN_AMAX) / fp8.E4M3_MAX
            out += [(t.float() / s).to(fp8.E4M3), s.expand(b, h).contiguous()]
        return out[0], out[2], out[4], out[1], out[3], out[5]

    def per_head(smooth_k: bool):
        return fp8_heads.reference_quantize_attention(q, k, v, smooth_k)

    v_mean = v.float().mean(dim=1, keepdim=True)

    def smooth_kv():
        q8, k8, _, qs, ks, _ = per_head(True)
        v8, vs = fp8_heads.quantize_heads((v.float() - v_mean).to(v.dtype))
        return q8, k8, v8, qs, ks, vs

    return {
        "fp8 per tensor": (per_tensor, lambda ops: fa3_fp8(*ops)),
        "fp8 per (batch, head)": (lambda: per_head(False), lambda ops: fa3_fp8(*ops)),
        "fp8 per (batch, head), K smoothed": (lambda: per_head(True), lambda ops: fa3_fp8(*ops)),
        "fp8 per (batch, head), K and V smoothed": (smooth_kv, lambda ops: fa3_fp8(*ops).float() + v_mean),
    }


def measure_attention(size: str, kinds: list[str], repeat: int) -> dict:
    tokens = tokens_of(SIZES[size])
    flop = 4 * 2 * HEADS * tokens * tokens * HEAD_DIM
    result: dict = {"tokens": tokens, "batch": 2, "heads": HEADS, "head_dim": HEAD_DIM}
    bf16 = {"flash3": attention.AttentionBackend.FLASH3, "cudnn": attention.AttentionBackend.CUDNN}
    if attention.flash4_available():
        bf16["flash4"] = attention.AttentionBackend.FLASH4
    for kind in kinds:
        q, k, v = attention_inputs(tokens, kind)
        exact = fp32_attention_rows(q, k, v, ERROR_ROWS)
        entry: dict = {}
        for name, backend in bf16.items():
            fn = attention.attention_fn(backend)
            out = fn(q, k, v)
            seconds = median_cuda(lambda fn=fn: fn(q, k, v), warmup=2, repeat=repeat)
            entry[f"bf16 {name}"] = {"ms": seconds * 1e3, "tflops": flop / seconds / 1e12,
                                     "rel_l2_vs_fp32": rel_l2(out[:, :ERROR_ROWS], exact)}  # fmt: skip
            del out
        for name, (quantize, attend) in attention_variants(q, k, v).items():
            ops = quantize()
            out = attend(ops)
            kernel_s = median_cuda(lambda ops=ops: fa3_fp8(*ops), warmup=2, repeat=repeat)
            entry[name] = {"ms": kernel_s * 1e3, "tflops": flop / kernel_s / 1e12,
                           "rel_l2_vs_fp32": rel_l2(out[:, :ERROR_ROWS], exact)}  # fmt: skip
            if name == SERVED_VARIANT:
                # The served quantization (smoothing, per-head amax, cast) compiled from torch ops, and the Triton
                # kernels of fp8_heads (a block's after fp8.use_quantize_kernels) with V as a block hands it over, a
                # slice of the fused projection's output.
                compiled = torch.compile(quantize, dynamic=False)
                compiled()
                entry[name]["quantize_compiled_ms"] = median_cuda(compiled, warmup=1, repeat=repeat) * 1e3
                strided_v = torch.cat((v, v), dim=-1)[..., :HEAD_DIM]
                kernels = fp8_heads.quantize_attention(q, k, strided_v)
                entry[name]["quantize_ms"] = (
                    median_cuda(lambda: fp8_heads.quantize_attention(q, k, strided_v), warmup=1, repeat=repeat) * 1e3
                )
                entry[name]["quantize_codes_differing"] = [
                    float((a.view(torch.uint8) != b.view(torch.uint8)).float().mean())
                    for a, b in zip(kernels[:3], ops[:3], strict=True)
                ]
                del kernels, strided_v
            del ops, out
        for name, e in entry.items():
            logger.info("%s %s %-42s %7.2f ms %5.0f TFLOP/s quant %5.2f ms (compiled %5.2f) rel_l2 %.2e", size, kind,
                        name, e["ms"], e["tflops"], e.get("quantize_ms", 0.0), e.get("quantize_compiled_ms", 0.0),
                        e["rel_l2_vs_fp32"])  # fmt: skip
        result[kind] = entry
        torch.cuda.empty_cache()
    return result


class _NormLinear(torch.nn.Module):
    """A block's layer norm + modulation, then one projection: how each block linear layer meets its input."""

    def __init__(self, linear: torch.nn.Module, dim: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = linear

    def forward(self, x, scale, shift):
        return self.linear((self.norm(x.float()) * (1 + scale) + shift).type_as(x))


def measure_linear(size: str, repeat: int) -> dict:
    tokens = 2 * tokens_of(SIZES[size])
    result: dict = {"rows": tokens}
    gen = torch.Generator("cuda").manual_seed(0)
    for name, (k_in, n_out) in LINEAR_SHAPES.items():
        linear = torch.nn.Linear(k_in, n_out, device="cuda")
        torch.nn.init.normal_(linear.weight, std=0.02, generator=gen)
        x = torch.randn(tokens, k_in, device="cuda", generator=gen).to(torch.bfloat16)
        scale, shift = (0.1 * torch.randn(k_in, device="cuda", generator=gen) for _ in range(2))
        exact = _NormLinear(linear, k_in)(x.float(), scale, shift)
        entry: dict = {}
        for variant in ("bf16", "fp8"):
            lin = copy.deepcopy(linear).to(torch.bfloat16)
            if variant == "fp8":
                lin = fp8.Fp8Linear.from_linear(lin)
            module = torch.compile(_NormLinear(lin, k_in), dynamic=False, fullgraph=True)
            out = module(x, scale, shift)
            seconds = median_cuda(lambda m=module: m(x, scale, shift), warmup=2, repeat=repeat)
            entry[variant] = {"ms": seconds * 1e3, "tflops": 2 * tokens * k_in * n_out / seconds / 1e12,
                              "rel_l2_vs_fp32": rel_l2(out, exact)}  # fmt: skip
        x8, xs = fp8.quantize_rows(x)
        w8, ws = fp8.quantize_weight(linear.weight.to(torch.bfloat16))
        seconds = median_cuda(lambda: fp8.scaled_matmul(x8, xs, w8, ws, torch.bfloat16), warmup=2, repeat=repeat)
        entry["fp8 GEMM alone"] = {"ms": seconds * 1e3, "tflops": 2 * tokens * k_in * n_out / seconds / 1e12}
        logger.info("%s %-12s bf16 %.2f ms (%.1e)  fp8 %.2f ms (%.1e)  fp8 GEMM alone %.2f ms", size, name,
                    entry["bf16"]["ms"], entry["bf16"]["rel_l2_vs_fp32"], entry["fp8"]["ms"],
                    entry["fp8"]["rel_l2_vs_fp32"], entry["fp8 GEMM alone"]["ms"])  # fmt: skip
        result[name] = entry
    return result


def _agreement(ours: tuple[torch.Tensor, torch.Tensor], served: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """How far two per-token quantizations of the same rows differ: e4m3 codes that differ, and the dequantized
    values' largest difference relative to the row's amax."""
    (q, scale), (q_ref, scale_ref) = ours, served
    deq, deq_ref = q.float() * scale, q_ref.float() * scale_ref
    return {
        "codes_differing": float((q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean()),
        "max_diff_of_amax": float(((deq - deq_ref).abs().amax(-1) / (scale_ref[:, 0] * fp8.E4M3_MAX)).max()),
    }


def measure_quant(size: str, repeat: int, launches: list[str]) -> dict:
    from wan_triton.kernels import fp8_rows_triton

    tokens = tokens_of(SIZES[size])
    gen = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(2, tokens, DIM, device="cuda", generator=gen).to(torch.bfloat16)
    delta = torch.randn(2, tokens, DIM, device="cuda", generator=gen).to(torch.bfloat16)
    ffn_hidden = torch.randn(2 * tokens, 13824, device="cuda", generator=gen).to(torch.bfloat16)
    mod_scale, mod_shift, gate = (0.1 * torch.randn(2, 1, DIM, device="cuda", generator=gen) for _ in range(3))
    weight = 1 + 0.1 * torch.randn(DIM, device="cuda", generator=gen)
    bias = 0.1 * torch.randn(DIM, device="cuda", generator=gen)
    eps = 1e-6

    def norm_mod(x):
        return (F.layer_norm(x.float(), (DIM,), eps=eps) * (1 + mod_scale) + mod_shift).type_as(x)

    def residual_affine(x, d):
        x = (x.float() + d * gate).type_as(x)
        return x, F.layer_norm(x.float(), (DIM,), weight, bias, eps).type_as(x)

    compiled = {
        "bf16 norm + modulation": lambda: norm_mod(hidden),
        "norm + modulation + quantize": lambda: fp8.quantize_rows(norm_mod(hidden).reshape(-1, DIM)),
        "residual + affine norm + quantize": lambda: (lambda x, n: (x, *fp8.quantize_rows(n.reshape(-1, DIM))))(
            *residual_affine(hidden, delta)
        ),
        "quantize": lambda: fp8.quantize_rows(hidden.reshape(-1, DIM)),
        "gelu + quantize": lambda: fp8.quantize_rows(F.gelu(ffn_hidden, approximate="tanh")),
    }
    # The one-pass kernels, with the launch given (None: the served one, `fp8_rows_triton.launch_for`); each
    # returns what its compiled twin does, ending in the [M, K] e4m3 values and [M, 1] scales.
    triton_kernels = {
        "norm + modulation + quantize": lambda launch: fp8_rows_triton.norm_quantize_rows(
            hidden, eps, mod_scale=mod_scale, mod_shift=mod_shift, launch=launch
        )[1:],
        "residual + affine norm + quantize": lambda launch: fp8_rows_triton.norm_quantize_rows(
            hidden, eps, delta=delta, gate=gate, weight=weight, bias=bias, launch=launch
        ),
        "quantize": lambda launch: fp8_rows_triton.gelu_quantize_rows(hidden, apply_gelu=False, launch=launch),
        "gelu + quantize": lambda launch: fp8_rows_triton.gelu_quantize_rows(ffn_hidden, launch=launch),
    }
    result: dict = {"rows": 2 * tokens}
    for name, fn in compiled.items():
        fn = torch.compile(fn, dynamic=False, fullgraph=True)
        served = fn()
        entry = {"compiled_ms": median_cuda(fn, warmup=2, repeat=repeat) * 1e3}
        if name in triton_kernels:
            kernel = triton_kernels[name]
            ours = kernel(None)
            entry["triton_ms"] = median_cuda(lambda k=kernel: k(None), warmup=2, repeat=repeat) * 1e3
            entry["served_launch"] = str(fp8_rows_triton.launch_for(ours[-2].shape[-1], name == "quantize"))
            entry |= _agreement(ours[-2:], served[-2:])
            if name.startswith("residual"):
                entry["hidden_max_diff"] = float((ours[0].float() - served[0].float()).abs().max())
            entry["launches"] = {}
            for text in launches:
                launch = fp8_rows_triton.Launch.parse(text)
                ours = kernel(launch)
                entry["launches"][text] = {
                    "ms": median_cuda(lambda k=kernel, x=launch: k(x), warmup=2, repeat=repeat) * 1e3,
                    **_agreement(ours[-2:], served[-2:]),
                }
        logger.info("%s %-36s %s", size, name, entry)
        result[name] = entry
    return result


# The one-pass kernels a block runs (fp8.Fp8TransformerBlock), by row width and how often: the norm + modulation
# before self-attention; the residual add + affine norm before cross-attention, and the residual add + modulated norm
# before the FFN, timed as the former; the GELU before the FFN's output layer.
BLOCK_KERNELS = {
    "norm + modulation + quantize": (DIM, 1),
    "residual + affine norm + quantize": (DIM, 2),
    "gelu + quantize": (13824, 1),
}
# A launch computes the served launch's math: its e4m3 codes may differ from the compiled torch ops' (where the bf16
# rounding of the norm's output falls) by at most this much more than the served launch's do.
CODES_DIFFERING_MARGIN = 1e-3


def choose_launches(quant: dict) -> dict[str, str]:
    """Per row width, the launch (the served one among them) with the least time summed over the sizes measured and
    the block's kernels of that width, each as often as a block runs it; only launches whose e4m3 codes agree with
    the compiled torch ops' as well as the served launch's do (CODES_DIFFERING_MARGIN), everywhere."""
    costs: dict[int, dict[str, float]] = {}
    for entries in quant.values():
        for name, (width, count) in BLOCK_KERNELS.items():
            entry = entries[name]
            bound = entry["codes_differing"] + CODES_DIFFERING_MARGIN
            options = {entry["served_launch"]: (entry["triton_ms"], entry["codes_differing"])}
            options |= {text: (e["ms"], e["codes_differing"]) for text, e in entry["launches"].items()}
            slot = costs.setdefault(width, {})
            for text, (ms, differing) in options.items():
                slot[text] = slot.get(text, 0.0) + (count * ms if differing <= bound else math.inf)
    return {str(width): min(slot, key=slot.__getitem__) for width, slot in costs.items()}


def block_inputs(model, size: str):
    from wan_bench.experts import step_inputs

    latents, text = step_inputs(A14B_TRANSFORMER, SIZES[size], "cuda", torch.bfloat16)
    latents = latents.to(torch.bfloat16).expand(2, -1, -1, -1, -1).contiguous()
    return {"hidden_states": latents, "timestep": torch.tensor([900, 900], device="cuda"),
            "encoder_hidden_states": text}  # fmt: skip


def measure_block(sizes: list[str], repeat: int, backend: str) -> dict:
    """A one-block A14B model (patch embedding, one block, head): the block dominates its time."""
    config = dict(A14B_TRANSFORMER, num_layers=1)
    base = build_expert(config, torch.bfloat16, "cuda").eval()
    result: dict = {}
    exact_model = None
    for variant in ("bf16", "fp8 per layer", "fp8"):
        model = copy.deepcopy(base)
        if variant.startswith("fp8"):
            fp8.install(model, backend, torch.device("cuda"), one_pass=variant == "fp8")
        else:
            attention.install(model, backend, torch.device("cuda"))
        model.compile_repeated_blocks(fullgraph=True, dynamic=False)
        for size in sizes:
            inputs = block_inputs(model, size)
            with torch.inference_mode():
                out = model(**inputs, return_dict=False)[0]
                seconds = median_cuda(lambda m=model, i=inputs: m(**i, return_dict=False), warmup=1, repeat=repeat)
            entry = result.setdefault(size, {})
            entry[variant] = {"ms": seconds * 1e3}
            if size == "480p":
                if exact_model is None:
                    exact_model = copy.deepcopy(base).float()
                    with torch.inference_mode(), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                        fp32_in = {n: t.float() if t.is_floating_point() else t for n, t in inputs.items()}
                        entry["fp32_out"] = exact_model(**fp32_in, return_dict=False)[0]
                entry[variant]["rel_l2_vs_fp32"] = rel_l2(out, entry["fp32_out"])
            logger.info("%s block %s %.1f ms %s", size, variant, seconds * 1e3, entry[variant])
        del model
        torch.cuda.empty_cache()
    for entry in result.values():
        entry.pop("fp32_out", None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["attention", "linear", "quant", "block"])
    parser.add_argument("--sizes", nargs="+", default=["480p", "720p"])
    parser.add_argument("--kinds", nargs="+", default=["gaussian", "offset"])
    parser.add_argument("--backend", default="auto", help="bf16 attention kernel of the block comparison")
    parser.add_argument("--repeat", type=int, default=5)
    # quant: the Triton kernels also with these launches, CHUNKxWARPS (chunk 0: the whole row in registers)
    parser.add_argument("--launches", nargs="*", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.recompile_limit = 64  # one compiled variant per layer shape, size and precision
    result: dict = {**run_record(torch.cuda.get_device_name()), "error_rows": ERROR_ROWS}
    if "attention" in args.parts:
        result["attention"] = {size: measure_attention(size, args.kinds, args.repeat) for size in args.sizes}
        write_json(args.out, result)
    if "linear" in args.parts:
        result["linear"] = {size: measure_linear(size, args.repeat) for size in args.sizes}
        write_json(args.out, result)
    if "quant" in args.parts:
        result["quant"] = {size: measure_quant(size, args.repeat, args.launches) for size in args.sizes}
        result["quant_choice"] = choose_launches(result["quant"])
        logger.info("fastest launch per row width: %s", result["quant_choice"])
        write_json(args.out, result)
    if "block" in args.parts:
        result["block"] = measure_block(args.sizes, args.repeat, args.backend)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
