"""One denoising step of Wan2.2-T2V-A14B on a GPU: this project's denoiser against diffusers, in one run.

Builds one A14B expert (the real shapes, 14.29 B parameters) with random bf16 weights directly on the device
(`wan_bench.experts`: no checkpoint download, and speed does not depend on weight values), then times, at each
size:
  - diffusers' WanTransformer3DModel as WanPipeline runs it: two forwards (cond, uncond), default attention;
  - this project's step: `wan_triton.model.denoise.denoise_step` on the torch engine as `components.build_denoiser`
    makes it (`attention.install`: chosen kernel + fused projections; optionally regional torch.compile): one
    batch-2 forward (cond + uncond), the guidance combine and the UniPC update;
  - the bf16 GEMM rate of this GPU, and the FLOP floor of a step from it.
Writes JSON (--out) and prints a table. On a GPU host (`benchmarks/gpu/attention.sh step SIZE` runs it for the
FlashAttention kernels):

    python benchmarks/denoiser_step.py --sizes 480p 720p --backends cudnn flash4 --out $OUT/step.json

A backend may be listed twice (flash4 flash3 flash4): the repeat shows how far the GPU drifted over the run.
`fp8` (or `fp8+compile`) is `precision: fp8` (wan_triton.kernels.fp8 over the `auto` kernel). `fp8-attention` and
`fp8-linear` are its parts, for each part's share of the gain: self-attention in FP8 alone, then the block linear
layers too, each quantizing its own bf16 input; `fp8` adds the one-pass quantization, as served; `fp8-kernels` adds
the Triton kernels for the attention operands and outputs (`fp8.use_quantize_kernels`); `fp8-launches` adds the
one-pass kernels at the launches of --fp8-launches (a candidate against the served ones, e.g. the
`quant_choice` of benchmarks/fp8_kernels.py). Each builds on the one before and quantizes the expert in place, so
they come last in the list, in that order, with one size per run:

    python benchmarks/denoiser_step.py --sizes 480p --backends flash4+compile fp8-attention+compile \
        fp8-linear+compile fp8+compile fp8-launches+compile --fp8-launches 5120=512x8 13824=512x8 --out $OUT/step.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wan_bench.experts import (
    A14B_TRANSFORMER,
    SIZES,
    build_expert,
    forward_flop,
    guided_step,
    step_inputs,
    tokens_of,
)
from wan_bench.records import run_record, write_json
from wan_bench.timing import gemm_tflops, time_cuda
from wan_triton.kernels import attention, fp8
from wan_triton.kernels.attention import AttentionBackend, flash3_available, flash4_available
from wan_triton.runtime.engines.torch_engine import denoiser_engine

if TYPE_CHECKING:
    from wan_triton.kernels.fp8_rows_triton import Launch

logger = logging.getLogger("benchmarks.denoiser_step")

STEP_SIZES = ("480p", "720p")
# precision fp8 part by part, each variant adding to the one before (wan_triton.kernels.fp8.install's parts)
FP8_PARTS = ("fp8-attention", "fp8-linear", "fp8", "fp8-kernels", "fp8-launches")


def install_fp8_part(model: torch.nn.Module, part: str, launches: dict[int, Launch]) -> None:
    """One of `fp8.install`'s parts (or the launches of the one-pass kernels), on a model that has the ones before it
    (FP8_PARTS)."""
    if part == "fp8-attention":
        fp8.install_attention(model, "auto", torch.device("cuda"))
    elif part == "fp8-linear":
        fp8.quantize_module(model)
    elif part == "fp8":
        fp8.install_blocks(model)
    elif part == "fp8-kernels":
        fp8.use_quantize_kernels()
    else:
        from wan_triton.kernels import fp8_rows_triton

        fp8_rows_triton.use_launches(launches)


def parse_launches(texts: list[str]) -> dict[int, Launch]:
    """WIDTH=CHUNKxWARPS[uUNROLL] each (fp8_rows_triton.Launch) -> {width: launch}."""
    from wan_triton.kernels.fp8_rows_triton import Launch

    launches = {}
    for text in texts:
        width, _, launch = text.partition("=")
        launches[int(width)] = Launch.parse(launch)
    return launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(STEP_SIZES), choices=STEP_SIZES)
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["cudnn", "flash4"],
        help="attention kernels; append +compile for regional torch.compile of every block",
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--fp8-launches", nargs="*", default=[], metavar="WIDTH=LAUNCH", help="the launches of the fp8-launches variant"
    )
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument(
        "--both-experts",
        action="store_true",
        help="keep a second expert resident (as serving does) so peak memory covers both",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fp8_listed = [n.removesuffix("+compile") for n in args.backends if n.startswith("fp8")]
    if fp8_listed and (
        len(args.sizes) > 1
        or any(not n.startswith("fp8") for n in args.backends[-len(fp8_listed) :])
        or fp8_listed != sorted(set(fp8_listed), key=FP8_PARTS.index)
    ):
        parser.error(f"fp8 quantizes the expert in place: list its parts last, in the order {FP8_PARTS}, one size")
    if ("fp8-launches" in fp8_listed) != bool(args.fp8_launches):
        parser.error("the fp8-launches variant and --fp8-launches come together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = True

    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    result: dict = {
        **run_record(torch.cuda.get_device_name()),
        "flash4_available": flash4_available(),
        "flash3_available": flash3_available(),
        "fp8_launches": args.fp8_launches,
        "sizes": {},
    }
    result["gemm_tflops"] = gemm_tflops()
    logger.info("bf16 GEMM 8192^3: %.0f TFLOP/s", result["gemm_tflops"])
    started = time.perf_counter()
    model = build_expert()
    logger.info(
        "built A14B expert (%.2f B params) in %.1f s",
        sum(p.numel() for p in model.parameters()) / 1e9,
        time.perf_counter() - started,
    )
    second = build_expert() if args.both_experts else None  # resident only, for the memory figure
    weights_gb = torch.cuda.memory_allocated() / 1e9
    result["resident_experts"] = 2 if second is not None else 1

    for size in args.sizes:
        tokens = tokens_of(SIZES[size])
        latents, text = step_inputs(A14B_TRANSFORMER, SIZES[size], "cuda", torch.bfloat16)
        t = torch.tensor([900], device="cuda")
        step_flop = 2 * forward_flop(tokens)
        entry: dict = {
            "tokens": tokens,
            "step_pflop": step_flop / 1e15,
            "floor_s": step_flop / (result["gemm_tflops"] * 1e12),
            "weights_gb": weights_gb,
        }

        if not args.skip_diffusers:
            if getattr(model.blocks[0].attn1, "fused_projections", False):
                raise SystemExit("diffusers baseline needs unfused projections: list one size per run")
            model.set_attn_processor(WanAttnProcessor())
            x = latents.to(torch.bfloat16)

            def diffusers_step():
                cond = model(x, t, text[0:1], return_dict=False)[0]
                uncond = model(x, t, text[1:2], return_dict=False)[0]
                return uncond + 4.0 * (cond - uncond)

            torch.cuda.reset_peak_memory_stats()
            times = time_cuda(diffusers_step, warmup=1, repeat=args.repeat)
            entry["diffusers"] = {
                "step_s": statistics.median(times),
                "times": times,
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            }
            logger.info("%s diffusers step: %.3f s", size, entry["diffusers"]["step_s"])

        fp8_installed: list[str] = []
        launches = parse_launches(args.fp8_launches) if args.fp8_launches else {}
        for name in args.backends:
            if (part := name.removesuffix("+compile")) in FP8_PARTS:
                # As components.build_denoiser at precision fp8 (fp8.install), up to this part; irreversible, so
                # the last variants of the run.
                for missing in FP8_PARTS[len(fp8_installed) : FP8_PARTS.index(part) + 1]:
                    install_fp8_part(model, missing, launches)
                    fp8_installed.append(missing)
                    if missing == "fp8-linear":
                        torch.cuda.empty_cache()
                        entry["fp8_weights_gb"] = torch.cuda.memory_allocated() / 1e9
                        logger.info("fp8 expert: %.1f GB on the device (bf16: %.1f GB)", entry["fp8_weights_gb"],
                                    weights_gb)  # fmt: skip
            else:
                backend = AttentionBackend(name.removesuffix("+compile"))
                if not result.get(f"{backend.value}_available", True):
                    logger.info("%s not installed; skipped", backend.value)
                    continue
                # As components.build_denoiser: kernel + fused projections (irreversible, so after diffusers).
                attention.install(model, backend, torch.device("cuda"))
            for block in model.blocks:
                block._compiled_call_impl = None  # undo an earlier variant's compile
            if name.endswith("+compile"):
                torch._dynamo.reset()
                model.compile_repeated_blocks(fullgraph=True, dynamic=False)
            engine = denoiser_engine(model, torch.device("cuda"), torch.bfloat16)
            our_step = guided_step(engine, None, latents.clone(), text)

            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            our_step()
            torch.cuda.synchronize()
            logger.info("%s first step (%s, includes compile) %.1f s", size, name, time.perf_counter() - started)
            times = time_cuda(our_step, warmup=0, repeat=args.repeat)
            # A backend listed again (A, B, A: to see the GPU drift over the run) gets its own entry.
            key = f"ours_{name}"
            key = next(f"{key}#{n}" for n in range(2, 99) if f"{key}#{n}" not in entry) if key in entry else key
            entry[key] = {
                "step_s": statistics.median(times),
                "times": times,
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            }
            logger.info("%s ours (%s) step: %.3f s", size, key, entry[key]["step_s"])
        result["sizes"][size] = entry
        write_json(args.out, result)

    print(f"\n{result['device']}  commit {result['commit']}  bf16 GEMM {result['gemm_tflops']:.0f} TFLOP/s")
    print(f"{'size':6} {'variant':16} {'step s':>8} {'x diffusers':>11} {'x floor':>8} {'peak GB':>8}")
    for size, entry in result["sizes"].items():
        base = entry.get("diffusers", {}).get("step_s")
        for key, value in entry.items():
            if isinstance(value, dict):
                ratio = f"{base / value['step_s']:.2f}" if base else "-"
                print(
                    f"{size:6} {key:16} {value['step_s']:8.3f} {ratio:>11} {value['step_s'] / entry['floor_s']:8.2f} "
                    f"{value['peak_gb']:8.1f}"
                )
        print(f"{size:6} {'floor':16} {entry['floor_s']:8.3f}")


if __name__ == "__main__":
    main()
