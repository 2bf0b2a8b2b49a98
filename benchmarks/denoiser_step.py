"""One denoising step of Wan2.2-T2V-A14B on a GPU: this project's denoiser against diffusers, in one run.

Builds one A14B expert (the real shapes, 14.29 B parameters) with random bf16 weights directly on the device
(no download is possible, and speed does not depend on weight values), then times, at each size:
  - diffusers' WanTransformer3DModel as WanPipeline runs it: two forwards (cond, uncond), default attention;
  - this project's step: `wan_triton.model.denoise.denoise_step` on the torch engine as `components.build_denoiser`
    makes it (`attention.install`: chosen kernel + fused projections; optionally regional torch.compile): one
    batch-2 forward (cond + uncond), the guidance combine and the UniPC update;
  - the bf16 GEMM rate of this GPU, and the FLOP floor of a step from it.
Writes JSON (--out) and prints a table. Usage on the GPU host:

    python benchmarks/denoiser_step.py --sizes 480p 720p --backends cudnn flash4 --out $OUT/step.json

A backend may be listed twice (flash4 flash3 flash4): the repeat shows how far the GPU drifted over the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("python_backend", "build")]

from wan_build.shapes_checkpoint import A14B_TRANSFORMER, SCHEDULER  # noqa: E402
from wan_triton.kernels import attention  # noqa: E402
from wan_triton.kernels.attention import AttentionBackend, flash3_available, flash4_available  # noqa: E402
from wan_triton.model import random_init as random_weights  # noqa: E402
from wan_triton.model.denoise import denoise_step  # noqa: E402
from wan_triton.runtime.engines.torch_engine import denoiser_engine  # noqa: E402

logger = logging.getLogger("benchmarks.denoiser_step")

SIZES = {"480p": (480, 832), "720p": (720, 1280)}
NUM_FRAMES = 81
TEXT_LEN = 512


def forward_flop(tokens: int, cfg: dict = A14B_TRANSFORMER) -> float:
    """Matmul FLOP of one forward (batch 1): QKVO, cross-attn Q/O and K/V on the text, FFN, both attentions."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    per_layer = (
        8 * tokens * d * d  # self-attn Q, K, V, O
        + 4 * tokens * d * d  # cross-attn Q, O
        + 4 * TEXT_LEN * d * d  # cross-attn K, V on the text tokens
        + 4 * tokens * d * cfg["ffn_dim"]  # FFN in and out
        + 4 * tokens * tokens * d  # self-attention QK^T and PV
        + 4 * tokens * TEXT_LEN * d  # cross-attention
    )
    return cfg["num_layers"] * per_layer


def run_header() -> dict:
    """What every GPU result file records about its run: device, commit (COMMIT: the host has no .git), versions,
    date and command."""
    return {
        "device": torch.cuda.get_device_name(),
        "commit": os.environ.get("COMMIT", "unknown"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }


def time_cuda(fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    times = time_cuda(lambda: a @ b, warmup=5, repeat=20)
    return 2 * n**3 / statistics.median(times) / 1e12


def build_expert():
    """A14B expert with random weights made on the GPU, dtypes as `from_pretrained(torch_dtype=bf16)` leaves them."""
    from diffusers import WanTransformer3DModel

    return random_weights.build(
        lambda: WanTransformer3DModel(**A14B_TRANSFORMER),
        torch.bfloat16,
        "cuda",
        list(WanTransformer3DModel._keep_in_fp32_modules),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["480p", "720p"], choices=list(SIZES))
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["cudnn", "flash4"],
        help="attention kernels; append +compile for regional torch.compile of every block",
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument(
        "--both-experts",
        action="store_true",
        help="keep a second expert resident (as serving does) so peak memory covers both",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = True

    from diffusers import UniPCMultistepScheduler
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    result: dict = {
        **run_header(),
        "flash4_available": flash4_available(),
        "flash3_available": flash3_available(),
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
        height, width = SIZES[size]
        shape = (1, 16, (NUM_FRAMES - 1) // 4 + 1, height // 8, width // 8)
        tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
        gen = torch.Generator("cuda").manual_seed(0)
        latents = torch.randn(shape, device="cuda", generator=gen)
        text = torch.randn(2, TEXT_LEN, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
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

        for name in args.backends:
            backend = AttentionBackend(name.removesuffix("+compile"))
            if not result.get(f"{backend.value}_available", True):
                logger.info("%s not installed; skipped", backend.value)
                continue
            # As components.build_denoiser: kernel + fused projections (irreversible, so after the diffusers run).
            attention.install(model, backend, torch.device("cuda"))
            for block in model.blocks:
                block._compiled_call_impl = None  # undo an earlier variant's compile
            if name.endswith("+compile"):
                torch._dynamo.reset()
                model.compile_repeated_blocks(fullgraph=True, dynamic=False)
            engine = denoiser_engine(model, torch.device("cuda"), torch.bfloat16)
            solver = UniPCMultistepScheduler(**SCHEDULER)
            solver.set_timesteps(1000, device="cuda")
            state = {"latents": latents.clone(), "i": 0}

            def our_step():
                ts = solver.timesteps[state["i"] % 1000]
                state["latents"] = denoise_step(engine, solver, state["latents"], ts, text, 4.0)
                state["i"] += 1

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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

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
