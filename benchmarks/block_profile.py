"""Where a denoising step's time goes on one GPU: the attention kernel's tile choices, and one A14B block by kernel.

A parallel plan only divides a step's time, so what one GPU spends on a block bounds every plan
(benchmarks/RESULTS.md has the step against its FLOP floor). Two measurements, in one run:

1. `attention`: FlashAttention-4's forward at each SM90 tile configuration the kernel's own search
   (`flash_attn/cute/sm90_config_search.py`) finds feasible for head size 128, against its default (128x128), the
   served `flash4` and `flash3` ops and cuDNN SDPA, on the shapes the server runs: batch 2 x 40 heads (one GPU,
   guidance as batch) and batch 1 x 10 heads (a rank of cfg2 x ulysses4). Each output is compared with the
   default's, so a broken configuration shows, and with fp32 attention on the first query rows (accuracy).
2. `block`: one transformer block of the A14B shape as the server builds it (`attention.install` with the chosen
   kernel and fused projections, regional `torch.compile`), timed with CUDA events and profiled: CUDA kernel time
   by category (attention, GEMM, compiler-fused elementwise, other), the GEMMs' rate against their FLOP, and the
   top kernels by name.

Random bf16 weights built on the GPU (speed does not depend on weight values). On a GPU host with the
FlashAttention-4 add-on (`benchmarks/gpu/attention.sh check` runs the attention part):

    python benchmarks/block_profile.py --sizes 480p 720p --out $OUT/block_profile.json
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from wan_bench.experts import (
    A14B_TRANSFORMER,
    SIZES,
    TEXT_LEN,
    build_expert,
    latent_shape,
    layer_linear_flop,
    tokens_of,
)
from wan_bench.profiling import profile_kernels, top_kernels
from wan_bench.records import run_record, write_json
from wan_bench.timing import time_cuda
from wan_triton.kernels import attention

logger = logging.getLogger("benchmarks.block_profile")

BLOCK_SIZES = ("480p", "720p")
HEAD_DIM = 128
# (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap, threads): SM90 forward configurations for head size 128 that
# sm90_config_search.py lists as fitting registers and shared memory; 3 warpgroups of 128 threads compute a 192-row
# tile, 2 a 128-row one (plus one producer warpgroup).
TILES = [
    (128, 128, True, True, 384),  # the kernel's default for head size 128
    (128, 144, True, True, 384),
    (128, 160, True, True, 384),
    (128, 176, True, True, 384),  # FlashAttention-3's C++ choice for head size 128, non-causal
    (128, 192, True, True, 384),
    (128, 176, True, False, 384),
    (192, 128, True, False, 512),
    (192, 112, True, False, 512),
]


REFERENCE_ROWS = 1024  # query rows of each (batch, head) compared against fp32 attention


def fp32_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """Attention of the first `rows` queries of every (batch, head) against all keys, in fp32 with TF32 off: the
    accuracy reference each kernel's bf16 output is measured against. q, k, v: [B, S, H, D] -> [B, rows, H, D]."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = []
        for b in range(q.shape[0]):  # one sample at a time: the fp32 scores of 40 heads at 720p take 12 GB
            qb, kb, vb = (t[b].transpose(0, 1).float() for t in (q[:, :rows], k, v))  # [H, S, D]
            scores = qb @ kb.transpose(1, 2) * q.shape[-1] ** -0.5
            out.append((scores.softmax(-1) @ vb).transpose(0, 1))
            del scores
        return torch.stack(out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def attention_sweep(size: str, batch: int, heads: int, tiles: list[tuple], repeat: int, rounds: int) -> dict:
    """Each configuration timed `repeat` times per round, the configurations interleaved over `rounds` rounds (so a
    drift of the GPU's clock over the sweep spreads over all of them); the median over all timings is reported.
    Besides FlashAttention-4's tiles: the served `flash4` op (its tile rule), the served `flash3` op
    (FlashAttention-3, where installed) and cuDNN SDPA; each output's error against fp32 attention is reported."""
    from flash_attn.cute.interface import _flash_attn_fwd

    seq = tokens_of(SIZES[size])
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (
        torch.randn(batch, seq, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "qkv"
    )
    flop = 4 * batch * heads * seq * seq * HEAD_DIM
    reference = _flash_attn_fwd(q, k, v)[0].float()
    exact_rows = fp32_attention_rows(q, k, v, REFERENCE_ROWS)
    candidates: dict[str, tuple] = {}
    for tile_m, tile_n, rs, overlap, threads in tiles:
        name = f"fa4 {tile_m}x{tile_n} rs={int(rs)} ol={int(overlap)}"
        candidates[name] = (
            lambda tm=tile_m, tn=tile_n, r=rs, o=overlap, t=threads: _flash_attn_fwd(
                q, k, v, tile_mn=(tm, tn), mma_pv_is_rs=r, intra_wg_overlap=o, num_threads=t
            )[0],
            {"tile_mn": [tile_m, tile_n], "mma_pv_is_rs": rs, "intra_wg_overlap": overlap, "num_threads": threads},
        )
    served = [attention.AttentionBackend.FLASH4]
    if attention.flash3_available():
        served.append(attention.AttentionBackend.FLASH3)
    for backend in served:
        candidates[f"served {backend.value}"] = (lambda fn=attention.attention_fn(backend): fn(q, k, v), {})
    candidates["cudnn sdpa"] = (lambda: attention.attention_fn(attention.AttentionBackend.CUDNN)(q, k, v), {})
    rows: dict[str, dict] = {}
    times: dict[str, list[float]] = defaultdict(list)
    for name, (fn, extra) in candidates.items():
        try:
            out = fn().float()
        except Exception as exc:  # noqa: BLE001 - a configuration the kernel rejects or fails to compile is a result too
            rows[name] = {"config": name, "error": f"{type(exc).__name__}: {exc}"[:300], **extra}
            logger.warning("%s %s b%d h%d: %s", size, name, batch, heads, rows[name]["error"])
            continue
        rel = ((out - reference).norm() / reference.norm()).item()
        rel_exact = ((out[:, :REFERENCE_ROWS] - exact_rows).norm() / exact_rows.norm()).item()
        rows[name] = {"config": name, "rel_l2_vs_default": rel, "rel_l2_vs_fp32": rel_exact, **extra}
    runnable = [name for name in candidates if "error" not in rows[name]]
    for _ in range(rounds):
        for name in runnable:
            times[name] += time_cuda(candidates[name][0], warmup=1, repeat=repeat)
    for name in runnable:
        median = statistics.median(times[name])
        rows[name].update(ms=median * 1e3, tflops=flop / median / 1e12, timings=len(times[name]))
        logger.info(
            "%s b%d h%d %-24s %8.2f ms %6.1f TFLOP/s rel %.1e, vs fp32 %.2e",
            size,
            batch,
            heads,
            name,
            median * 1e3,
            rows[name]["tflops"],
            rows[name]["rel_l2_vs_default"],
            rows[name]["rel_l2_vs_fp32"],
        )
    return {"size": size, "batch": batch, "heads": heads, "tokens": seq, "flop": flop, "rows": list(rows.values())}


def block_gemm_flop(tokens: int, batch: int) -> float:
    return batch * layer_linear_flop(tokens)


def build_model(backend: str):
    module = build_expert(dict(A14B_TRANSFORMER, num_layers=1))
    chosen = attention.install(module, backend, torch.device("cuda"))
    return module, chosen


def block_inputs(module, size: str, batch: int) -> tuple:
    """The block's arguments as the model's forward makes them (a forward pre-hook, before the block is compiled:
    a hook with side effects inside a fullgraph region would not compile)."""
    gen = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(batch, *latent_shape(SIZES[size])[1:], device="cuda", generator=gen)
    text = torch.randn(batch, TEXT_LEN, 4096, device="cuda", generator=gen)
    captured: dict = {}
    hook = module.blocks[0].register_forward_pre_hook(lambda _m, args: captured.setdefault("args", args))
    with torch.no_grad():
        module(
            latents.to(torch.bfloat16),
            torch.full((batch,), 900, device="cuda"),
            text.to(torch.bfloat16),
            return_dict=False,
        )
    hook.remove()
    return captured["args"]


def profile_block(module, args: tuple, size: str, batch: int, repeat: int) -> dict:
    block = module.blocks[0]
    with torch.no_grad():
        times = time_cuda(lambda: block(*args), warmup=2, repeat=repeat)
        kernels, by_category = profile_kernels(lambda: block(*args), repeat)
    tokens = tokens_of(SIZES[size])
    gemm_ms = by_category.get("gemm", 0.0)
    result = {
        "size": size,
        "batch": batch,
        "tokens": tokens,
        "block_ms": statistics.median(times) * 1e3,
        "kernel_ms_by_category": dict(by_category),
        "kernel_ms_total": sum(by_category.values()),
        "gemm_flop": block_gemm_flop(tokens, batch),
        "gemm_tflops": block_gemm_flop(tokens, batch) / (gemm_ms / 1e3) / 1e12 if gemm_ms else None,
        "top_kernels": top_kernels(kernels, repeat, 25, "calls_per_block"),
    }
    logger.info(
        "%s b%d block %.2f ms; by category %s",
        size,
        batch,
        result["block_ms"],
        {key: round(value, 2) for key, value in by_category.items()},
    )
    return result


def _rotate_by_stack(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding as served up to commit adf527a (a stack of the rotated halves), for comparison."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


@contextlib.contextmanager
def block_variant(name: str) -> Iterator[None]:
    """`served`: the block as served. `coordinate_descent`: inductor tunes its fused kernels' launch configurations
    (`coordinate_descent_tuning`). `rope_stack`: the rotary embedding written as before (`_rotate_by_stack`; the
    run of commit adf527a measured the served one as `rope_swap` against this one as `served`)."""
    import torch._inductor.config as inductor_config

    saved_rotate, saved_tuning = attention._rotate, inductor_config.coordinate_descent_tuning
    if name == "coordinate_descent":
        inductor_config.coordinate_descent_tuning = True
    elif name == "rope_stack":
        attention._rotate = _rotate_by_stack
    elif name != "served":
        raise ValueError(f"unknown block variant {name}")
    try:
        yield
    finally:
        attention._rotate, inductor_config.coordinate_descent_tuning = saved_rotate, saved_tuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(BLOCK_SIZES), choices=BLOCK_SIZES)
    parser.add_argument("--parts", nargs="+", default=["attention", "block"], choices=["attention", "block"])
    parser.add_argument("--backend", default="auto", help="attention backend of the profiled block")
    parser.add_argument(
        "--variants", nargs="+", default=["served"], choices=["served", "coordinate_descent", "rope_stack"]
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="attention: interleaved rounds of --repeat timings")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["2x40", "1x10"],
        help="attention: batch x heads per rank; 2x40 is one GPU (guidance as batch), 1x10 a rank of cfg2 x ulysses4",
    )
    parser.add_argument("--tiles", nargs="+", type=int, help="attention: indices into TILES (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    result: dict = {**run_record(torch.cuda.get_device_name()), "attention": [], "block": []}

    def save() -> None:
        write_json(args.out, result)

    if "attention" in args.parts:
        for size in args.sizes:
            tiles = [TILES[i] for i in args.tiles] if args.tiles else TILES
            for shape in args.shapes:
                batch, heads = (int(part) for part in shape.split("x"))
                result["attention"].append(attention_sweep(size, batch, heads, tiles, args.repeat, args.rounds))
                save()
    if "block" in args.parts:
        for variant in args.variants:
            torch._dynamo.reset()
            with block_variant(variant):
                module, chosen = build_model(args.backend)
                result["block_attention_backend"] = chosen.value
                inputs = {size: block_inputs(module, size, 2) for size in args.sizes}
                module.compile_repeated_blocks(fullgraph=True, dynamic=False)  # as components.build_denoiser does
                for size in args.sizes:
                    profiled = profile_block(module, inputs[size], size, 2, args.repeat)
                    result["block"].append({"variant": variant, **profiled})
                    save()
            del module, inputs
    save()


if __name__ == "__main__":
    main()
