"""Denoising-step time and peak memory of the served denoiser's runtime options, side by side in one run.

Each variant is the denoiser `components.build_denoiser` makes for `gpu_a14b.yaml` with one option changed, on a
configs-only A14B checkpoint (random bf16 weights built on the GPU; speed does not depend on weight values):

- `eager`     the served configuration without CUDA graphs (FlashAttention-4 or cuDNN, fused projections,
              regional compile), both experts resident;
- `graphs`    the same with `cuda_graphs: true` (each expert's forward replayed as a captured graph);
- `resident`  both experts on the device;
- `swap`      `expert_residency: swap`: both experts in pinned host memory, one on the device, the next one copied
              in block by block during the step before the switch.

Steps follow a fixed expert plan that crosses the switch both ways, as a request and the next one do:
high, high (copies the low-noise expert in when swapping), low, low (copies the high-noise expert back), high.
Each step is timed with CUDA events after one warm-up step per expert (which compiles, and captures graphs).
Writes JSON (--out) and prints a table. On a GPU host (`benchmarks/gpu/runtime.sh graphs|swap|swapgraphs` runs
it):

    python benchmarks/step_variants.py --sizes 720p --variants resident swap --out $OUT/swap.json
    python benchmarks/step_variants.py --sizes 240p 480p --variants eager graphs --out $OUT/graphs.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from wan_bench.experts import SIZES
from wan_bench.memory import release
from wan_bench.records import run_record, write_json
from wan_bench.timing import cuda_seconds
from wan_build.shapes_checkpoint import make_shapes_checkpoint
from wan_triton.components import build_denoiser
from wan_triton.config.deployment import Deployment
from wan_triton.model.checkpoint import MAX_SEQUENCE_LENGTH, Checkpoint
from wan_triton.model.denoise import denoise_step, latent_shape

logger = logging.getLogger("benchmarks.step_variants")

REPO = Path(__file__).resolve().parents[1]
STEP_SIZES = ("144p", "240p", "480p", "720p")
VARIANTS = {
    "eager": {"expert_residency": "resident", "cuda_graphs": False},
    "graphs": {"expert_residency": "resident", "cuda_graphs": True},
    "resident": {"expert_residency": "resident"},
    "swap": {"expert_residency": "swap"},
    # One device module serves both experts, so one graph per shape serves both too (the weights keep their
    # addresses); the steps that copy the next expert in run eagerly.
    "swap+graphs": {"expert_residency": "swap", "cuda_graphs": True},
}
# (expert of the step, expert the next step needs): crosses the switch both ways.
PLAN = [
    ("transformer", "transformer"),
    ("transformer", "transformer_2"),
    ("transformer_2", "transformer_2"),
    ("transformer_2", "transformer"),
    ("transformer", "transformer"),
]


def run_variant(ckpt: Checkpoint, name: str, sizes: list[str], repeat: int) -> dict:
    served = Deployment.load(REPO / "model_repository/deployments/gpu_a14b.yaml").components.denoiser
    cfg = served.model_copy(update=VARIANTS[name])
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    denoiser = build_denoiser(ckpt, cfg, Path("/nonexistent"))
    out: dict = {"config": cfg.model_dump(mode="json"), "load_s": time.perf_counter() - started, "sizes": {}}
    out["weights_gb"] = torch.cuda.memory_allocated() / 1e9
    swapper = denoiser.swapper
    for size in sizes:
        height, width, num_frames = SIZES[size]
        gen = torch.Generator("cuda").manual_seed(0)
        latents = torch.randn(latent_shape(ckpt, height, width, num_frames), device="cuda", generator=gen)
        embeds = torch.randn(2, MAX_SEQUENCE_LENGTH, ckpt.text_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        solver = ckpt.make_solver()
        solver.set_timesteps(1000, device="cuda")
        state = {"latents": latents, "i": 0}

        def step(expert: str, upcoming: str) -> float:
            if swapper is not None:
                swapper.prefetch(upcoming)
            t = solver.timesteps[state["i"] % 1000]

            def run() -> None:
                state["latents"] = denoise_step(denoiser.experts[expert], solver, state["latents"], t, embeds, 4.0)

            seconds = cuda_seconds(run)
            state["i"] += 1
            return seconds

        warm = time.perf_counter()
        step("transformer", "transformer_2")
        step("transformer_2", "transformer")
        logger.info("%s %s warm-up (compile, capture) %.1f s", name, size, time.perf_counter() - warm)
        torch.cuda.reset_peak_memory_stats()
        steps = []
        for _ in range(repeat):
            steps += [{"expert": e, "next": n, "seconds": step(e, n)} for e, n in PLAN]
        swap_steps = [s["seconds"] for s in steps if s["expert"] != s["next"]]
        plain_steps = [s["seconds"] for s in steps if s["expert"] == s["next"]]
        entry = {
            "steps": steps,
            "step_s": statistics.median(s["seconds"] for s in steps),
            "switch_step_s": statistics.median(swap_steps),
            "other_step_s": statistics.median(plain_steps),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        }
        if swapper is not None:
            entry["swaps_overlapped"], entry["swaps_blocking"] = swapper.swaps_overlapped, swapper.swaps_blocking
            entry["host_gb"] = swapper.host_bytes / 1e9
        out["sizes"][size] = entry
        logger.info("%s %s: median step %.3f s, peak %.1f GB", name, size, entry["step_s"], entry["peak_gb"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["720p"], choices=STEP_SIZES)
    parser.add_argument("--variants", nargs="+", default=["resident", "swap"], choices=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1, help="passes over the 5-step expert plan")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = True

    result: dict = {
        **run_record(torch.cuda.get_device_name()),
        "plan": PLAN,
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpoint.open(make_shapes_checkpoint(Path(tmp) / "a14b"))
        for name in args.variants:
            result["variants"][name] = run_variant(ckpt, name, args.sizes, args.repeat)
            # Free the last variant's device memory and compiled graphs before the next one is built.
            torch._dynamo.reset()
            release(torch.device("cuda"))
            write_json(args.out, result)

    print(f"\n{result['device']}  commit {result['commit']}")
    print(f"{'size':6} {'variant':10} {'step s':>8} {'switch s':>9} {'other s':>8} {'peak GB':>8}")
    for size in args.sizes:
        for name, variant in result["variants"].items():
            e = variant["sizes"][size]
            print(
                f"{size:6} {name:10} {e['step_s']:8.3f} {e['switch_step_s']:9.3f} {e['other_step_s']:8.3f} "
                f"{e['peak_gb']:8.1f}"
            )


if __name__ == "__main__":
    main()
