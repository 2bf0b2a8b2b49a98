"""The A14B feed-forward layer with and without its GELU in the GEMM's epilogue (`wan_triton.kernels.ffn`), on one GPU.

For each token count a rank runs (one GPU at 720p and 480p with guidance as batch 2, a rank of cfg2 x ulysses4 at
720p, and a tp2 rank whose FFN is half as wide), the whole FFN (Linear 5120 -> ffn, tanh GELU, Linear ffn -> 5120)
compiled as the served blocks are: `unfused` is diffusers' module (two cuBLAS GEMMs and an inductor GELU kernel),
`epilogue` the same module after `ffn.install`. Random bf16 operands (N(0, 1) activations, N(0, 0.02) weights);
relative L2 of each against an fp32 computation from the same bf16 operands, with the tanh GELU and, as a check of
which GELU the epilogue applies, the exact (erf) one. Kernel names of one epilogue call are listed.

    python benchmarks/ffn_epilogue.py --out $OUT/ffn_epilogue.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from wan_bench.records import run_record, write_json
from wan_bench.timing import time_cuda
from wan_triton.kernels import ffn

logger = logging.getLogger("benchmarks.ffn_epilogue")

DIM, FFN_DIM = 5120, 13824
# name: (tokens per GEMM, FFN width on the rank)
SHAPES = {
    "720p 1 GPU (2 x 75,600)": (151_200, FFN_DIM),
    "480p 1 GPU (2 x 32,760)": (65_520, FFN_DIM),
    "720p cfg2 x ulysses4 rank (18,900)": (18_900, FFN_DIM),
    "720p tp2 rank (2 x 75,600, half width)": (151_200, FFN_DIM // 2),
}


def _module(width: int) -> torch.nn.Module:
    from diffusers.models.attention import FeedForward

    module = FeedForward(DIM, inner_dim=width, activation_fn="gelu-approximate")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return module.to("cuda", torch.bfloat16).eval()


def _reference(module, x: torch.Tensor, approximate: str) -> torch.Tensor:
    proj, out = module.net[0].proj, module.net[2]
    hidden = F.gelu(F.linear(x.float(), proj.weight.float(), proj.bias.float()), approximate=approximate)
    return F.linear(hidden, out.weight.float(), out.bias.float())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def measure(name: str, tokens: int, width: int, repeat: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    unfused = _module(width)
    fused = copy.deepcopy(unfused)
    assert ffn.install(fused) == 1
    x = torch.randn(tokens, DIM, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(torch.bfloat16)
    tanh, erf = _reference(unfused, x, "tanh"), _reference(unfused, x, "none")
    row: dict = {"shape": name, "tokens": tokens, "ffn_width": width}
    with torch.no_grad():
        for variant, module in (("unfused", unfused), ("epilogue", fused)):
            compiled = torch.compile(module, fullgraph=True, dynamic=False)
            out = compiled(x)
            times = time_cuda(lambda c=compiled: c(x), warmup=2, repeat=repeat)
            row[variant] = {
                "ms": statistics.median(times) * 1e3,
                "rel_l2_vs_fp32_tanh": _rel(out, tanh),
                "rel_l2_vs_fp32_erf": _rel(out, erf),
            }
            if variant == "epilogue":
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    compiled(x)
                    torch.cuda.synchronize()
                row[variant]["kernels"] = sorted(
                    {e.name[:140] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
                )
    row["change"] = row["epilogue"]["ms"] / row["unfused"]["ms"] - 1
    logger.info(
        "%s: unfused %.2f ms, epilogue %.2f ms (%+.1f%%); rel L2 vs fp32 tanh %.2e / %.2e, vs erf %.2e / %.2e",
        name,
        row["unfused"]["ms"],
        row["epilogue"]["ms"],
        100 * row["change"],
        row["unfused"]["rel_l2_vs_fp32_tanh"],
        row["epilogue"]["rel_l2_vs_fp32_tanh"],
        row["unfused"]["rel_l2_vs_fp32_erf"],
        row["epilogue"]["rel_l2_vs_fp32_erf"],
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = {**run_record(torch.cuda.get_device_name()), "rows": []}
    for name, (tokens, width) in SHAPES.items():
        result["rows"].append(measure(name, tokens, width, args.repeat))
        write_json(args.out, result)


if __name__ == "__main__":
    main()
