"""Would FP8 linear layers pay on H100? The A14B block's GEMM shapes in bf16 against FP8 e4m3 `torch._scaled_mm`.

A block's GEMMs run at bf16 rates (benchmarks/block_profile.py; benchmarks/RESULTS.md), and H100's FP8 tensor cores
are rated at twice those. This measures, for each linear layer of a block (fused QKV, the output and
cross-attention projections, FFN in and out) at the token counts the server runs:
  - bf16 `F.linear` with bias (the served path);
  - FP8 with a scale per output channel of the weight and per token of the activation (`_scaled_mm` rowwise,
    with and without fast accumulation), plus the cost of quantizing the activation (amax per row, scale, cast);
  - the relative L2 error of each against an fp32 product of the same bf16 operands.
Random inputs (N(0, 1) activations, N(0, 0.02) weights, as trained Wan layers roughly are). On a GPU host:

    python benchmarks/fp8_gemm.py --out $OUT/fp8_gemm.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from wan_bench.records import run_record, write_json
from wan_bench.timing import median_cuda

logger = logging.getLogger("benchmarks.fp8_gemm")

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# name: (in_features, out_features) of the A14B block's linear layers (dim 5120, ffn 13824)
LAYERS = {
    "qkv": (5120, 15360),
    "out/cross_q/cross_out": (5120, 5120),
    "ffn_in": (5120, 13824),
    "ffn_out": (13824, 5120),
}
# tokens per GEMM: 720p and 480p with guidance as batch on one GPU, and a 720p rank of cfg2 x ulysses4
TOKENS = {"720p 1 GPU": 2 * 75600, "480p 1 GPU": 2 * 32760, "720p cfg2xulysses4 rank": 75600 // 4}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> (e4m3 values, fp32 scale per row [rows, 1]) with x ~= values * scale."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(tokens: int, in_features: int, out_features: int) -> dict:
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(tokens, in_features, device="cuda", generator=gen).to(torch.bfloat16)
    w = (0.02 * torch.randn(out_features, in_features, device="cuda", generator=gen)).to(torch.bfloat16)
    b = (0.02 * torch.randn(out_features, device="cuda", generator=gen)).to(torch.bfloat16)
    flop = 2 * tokens * in_features * out_features
    exact = torch.addmm(b.float(), x.float(), w.float().t())

    wq, w_scale = quantize_rows(w)  # per output channel
    xq, x_scale = quantize_rows(x)
    w_scale_t = w_scale.t().contiguous()  # [1, out_features]

    def fp8(fast: bool) -> torch.Tensor:
        return torch._scaled_mm(
            xq, wq.t(), scale_a=x_scale, scale_b=w_scale_t, bias=b, out_dtype=torch.bfloat16, use_fast_accum=fast
        )

    result: dict = {"tokens": tokens, "in_features": in_features, "out_features": out_features}
    bf16_s = median_cuda(lambda: F.linear(x, w, b))
    result["bf16"] = {"ms": bf16_s * 1e3, "tflops": flop / bf16_s / 1e12, "rel_l2": rel_l2(F.linear(x, w, b), exact)}
    result["quantize_activation_ms"] = median_cuda(lambda: quantize_rows(x)) * 1e3
    for fast in (False, True):
        key = "fp8_rowwise_fast_accum" if fast else "fp8_rowwise"
        try:
            seconds = median_cuda(lambda f=fast: fp8(f))
            result[key] = {"ms": seconds * 1e3, "tflops": flop / seconds / 1e12, "rel_l2": rel_l2(fp8(fast), exact)}
        except RuntimeError as exc:
            result[key] = {"error": str(exc)[:300]}
    logger.info("%6d x %5d -> %5d: %s", tokens, in_features, out_features, json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result: dict = {**run_record(torch.cuda.get_device_name()), "shapes": {}}
    for label, tokens in TOKENS.items():
        rows = {name: measure(tokens, *dims) for name, dims in LAYERS.items()}
        # One block: QKV once, the 5120x5120 shape three times (self-attn out, cross-attn Q and out), FFN in and out.
        uses = {"qkv": 1, "out/cross_q/cross_out": 3, "ffn_in": 1, "ffn_out": 1}
        totals = {}
        for key in ("bf16", "fp8_rowwise", "fp8_rowwise_fast_accum"):
            if all("ms" in rows[name].get(key, {}) for name in rows):
                totals[key] = sum(uses[name] * rows[name][key]["ms"] for name in rows)
        # Activations quantized per block: QKV/cross-Q share one (norm1 output) only if fused; count each GEMM input.
        totals["quantize_activations_ms"] = sum(uses[name] * rows[name]["quantize_activation_ms"] for name in rows)
        result["shapes"][label] = {"layers": rows, "block_totals_ms": totals}
        logger.info("%s block GEMMs: %s", label, totals)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
