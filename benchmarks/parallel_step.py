"""Step time of every parallel plan of world size 2 against 1 GPU, in one run, and the performance model.

Each of `--world-size` processes (one GPU each with NCCL; gloo on CPU) first measures the bus bandwidth of the
three collectives the plans use (all-reduce, all-to-all, all-gather) and their per-call latency, then, for the
1-GPU baseline (rank 0 alone, the project's single-process path: `attention.install` + `denoise_step`) and each
plan of the world size that fits the expert, builds one expert with random weights (A14B shapes in bf16; `--tiny`:
a 4-head tiny config in fp32), cuts it for the plan (`wan_triton.parallel`) and times guided denoising steps
(`denoise_step`: forward(s), CFG exchange, guidance combine, UniPC update), the slowest rank per step. With
`--ulysses-head-groups G`, each Ulysses plan is also timed with its exchanges in G head groups, overlapped with
attention (`+groups<G>` in the results).

The analytic model (`wan_bench.perf_model`, assumptions in its docstring) is calibrated with the 1-GPU
step time and the bandwidths of this run; its world-size-2 predictions are printed next to the measurements (the
check of the model) and it predicts every plan of 4 and 8 GPUs.

    python benchmarks/parallel_step.py --sizes 480p 720p --compile --out $OUT/parallel_step.json   # 2x H200
    python benchmarks/parallel_step.py --device cpu --backend gloo --tiny --out out/parallel_tiny.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("python_backend", "build")]

from wan_bench.perf_model import Bandwidth, ModelShape, plans_of, predict  # noqa: E402
from wan_build.shapes_checkpoint import A14B_TRANSFORMER, SCHEDULER  # noqa: E402
from wan_triton.config.plan import ParallelPlan  # noqa: E402

logger = logging.getLogger("benchmarks.parallel_step")

SIZES = {"480p": (480, 832, 81), "720p": (720, 1280, 81), "tiny": (64, 64, 9)}
TINY_TRANSFORMER = dict(A14B_TRANSFORMER, num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=2)
TINY_TRANSFORMER["text_dim"] = 32
TEXT_LEN = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Median over `repeat` of the slowest rank's time for `fn` (every rank enters together)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        dist.barrier()
        started = time.perf_counter()
        fn()
        _sync(device)
        # On the rank's device: NCCL reduces device tensors only.
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times)


def measure_bandwidth(device: torch.device, dtype: torch.dtype, nbytes: int, repeat: int) -> dict[str, float]:
    """Bus bandwidth (bytes / s, NCCL-tests' convention) per collective kind, and the latency of a tiny call."""
    n = dist.get_world_size()
    elems = nbytes // torch.finfo(dtype).bits * 8
    x = torch.randn(elems, device=device).to(dtype)
    out = torch.empty_like(x)
    parts = [torch.empty(elems // n, device=device, dtype=dtype) for _ in range(n)]
    # NCCL-tests' bus bandwidth: bytes x factor / time, the bytes being the whole buffer (an all-gather's output).
    kinds = {
        "all_reduce": (lambda: dist.all_reduce(x), 2 * (n - 1) / n),
        "all_to_all": (lambda: dist.all_to_all_single(out, x), (n - 1) / n),
        "all_gather": (lambda: dist.all_gather(parts, x[: elems // n].contiguous()), (n - 1) / n),
    }
    result = {}
    for kind, (fn, factor) in kinds.items():
        result[kind] = nbytes * factor / _timed(fn, device, repeat)
    small = torch.zeros(256, device=device, dtype=dtype)
    result["latency_s"] = _timed(lambda: [dist.all_reduce(small) for _ in range(20)], device, repeat) / 20
    return result


def _expert(config: dict, dtype: torch.dtype, device: torch.device):
    from diffusers import WanTransformer3DModel

    from wan_triton.model import random_init as random_weights

    torch.manual_seed(0)  # the same random weights on every rank
    return random_weights.build(
        lambda: WanTransformer3DModel(**config), dtype, str(device), list(WanTransformer3DModel._keep_in_fp32_modules)
    )


def variant_name(plan: ParallelPlan, head_groups: int = 1) -> str:
    """A plan as measured: its name, with `+groups<G>` where its Ulysses exchanges run in G head groups."""
    return str(plan) if head_groups == 1 else f"{plan}+groups{head_groups}"


def parse_variant(name: str) -> tuple[ParallelPlan, int]:
    """Inverse of `variant_name`: (plan, head groups)."""
    match = re.fullmatch(r"cfg(\d+)xulysses(\d+)xtp(\d+)(?:\+groups(\d+))?", name)
    if match is None:
        raise ValueError(f"not a plan name: {name!r} (e.g. cfg2xulysses4xtp1, or cfg2xulysses4xtp1+groups2)")
    cfg, ulysses, tp, groups = match.groups()
    return ParallelPlan(cfg=int(cfg), ulysses=int(ulysses), tp=int(tp)), int(groups or 1)


def grouped_variants(plans: list[ParallelPlan], head_groups: list[int], num_heads: int) -> list[tuple]:
    """(plan, G) for each Ulysses plan and each G > 1 that divides a rank's heads."""
    return [
        (plan, g)
        for plan in plans
        for g in head_groups
        if g > 1 and plan.ulysses > 1 and (num_heads // (plan.ulysses * plan.tp)) % g == 0
    ]


def add_head_groups_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ulysses-head-groups",
        nargs="+",
        type=int,
        default=[],
        metavar="G",
        help="also run each Ulysses plan with its exchanges in G head groups (the deployment's ulysses_head_groups)",
    )


def build_rank_expert(plan, groups, config: dict, dtype, device, attention_backend, ulysses_head_groups: int = 1):
    """One expert with random weights, as rank `groups.rank` of `plan` serves it: the single-GPU path
    (`attention.install`, exactly components.build_denoiser's) or cut for the plan (`parallelize`, rank.py's)."""
    from wan_triton.kernels import attention
    from wan_triton.parallel.sharding import parallelize

    module = _expert(config, dtype, device)
    if plan.is_single:
        attention.install(module, attention_backend, device)
    else:
        parallelize(module, groups, attention_backend, device, ulysses_head_groups)
    return module


def served_engine(module, plan, device, dtype, compile_blocks: bool, cuda_graphs: bool):
    """The engine a rank serves `module` with, through the code the server runs: regional compile and CUDA graphs
    as `components.build_denoiser` sets them up on one GPU and `parallel.rank` on a parallel rank."""
    from wan_triton.runtime.experts import compile_expert_blocks, torch_engines

    if compile_blocks:
        compile_expert_blocks(module, parallel=not plan.is_single)
    eager, graphed = torch_engines(module, device, dtype, cuda_graphs, parallel=not plan.is_single)
    return graphed or eager


def guided_step(engine, cfg_parallel, config: dict, size: tuple[int, int, int], device, dtype):
    """A function running one guided step (`denoise_step`: forward(s), CFG exchange, guidance combine, UniPC
    update) on fixed random latents and text at `size`, advancing through the solver's timesteps."""
    from diffusers import UniPCMultistepScheduler

    from wan_triton.model.denoise import denoise_step

    height, width, frames = size
    gen = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=gen).to(device)
    text = torch.randn(2, TEXT_LEN, config["text_dim"], generator=gen).to(device, dtype)
    solver = UniPCMultistepScheduler(**SCHEDULER)
    solver.set_timesteps(1000, device=device)
    state = {"latents": latents, "i": 0}

    def step():
        t = solver.timesteps[state["i"] % 1000]
        state["latents"] = denoise_step(engine, solver, state["latents"], t, text, 4.0, cfg_parallel)
        state["i"] += 1

    return step


def time_alone(step, device: torch.device, repeat: int, after_warmup=None) -> tuple[float, list[float]]:
    """(seconds of one warm-up call, seconds of each of `repeat` timed calls) of `step` in this process alone;
    `after_warmup()` runs between them (e.g. to reset peak-memory statistics)."""
    started = time.perf_counter()
    step()
    _sync(device)
    warmup_s = time.perf_counter() - started
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(repeat):
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - started)
    return warmup_s, times


def _time_plan(plan, config, size, dtype, device, args: dict, head_groups: int = 1):
    """Median step seconds of `plan` on the ranks it uses (None on the others)."""
    from wan_triton.parallel.cfg import CfgParallel
    from wan_triton.parallel.process_groups import create_groups

    groups = create_groups(plan)  # the 1-GPU baseline: rank 0 alone; the other ranks wait at the next barrier
    if groups is None:
        return None
    repeat = args["repeat"]
    module = build_rank_expert(plan, groups, config, dtype, device, args["attention"], head_groups)
    engine = served_engine(module, plan, device, dtype, args["compile"], args["cuda_graphs"])
    cfg_parallel = None if groups.cfg is None else CfgParallel(groups.cfg, groups.coords.cfg)
    step = guided_step(engine, cfg_parallel, config, size, device, dtype)
    if plan.world_size > 1:
        return _timed(step, device, repeat)
    return statistics.median(time_alone(step, device, repeat)[1])  # alone, so no barrier


def _rank_main(rank: int, args: dict) -> dict | None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(message)s")
    device = torch.device("cuda", rank) if args["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.float32 if args["tiny"] else torch.bfloat16
    config = TINY_TRANSFORMER if args["tiny"] else A14B_TRANSFORMER
    world = dist.get_world_size()
    out: dict = {"bandwidth": measure_bandwidth(device, dtype, args["bandwidth_bytes"], args["repeat"]), "sizes": {}}
    plans = plans_of(world, config["num_attention_heads"], config["ffn_dim"])
    variants = [(ParallelPlan(), 1), *((plan, 1) for plan in plans)]
    variants += grouped_variants(plans, args["ulysses_head_groups"], config["num_attention_heads"])
    for size_name in args["sizes"]:
        size = SIZES[size_name]
        entry = {}
        for plan, head_groups in variants:
            step_s = _time_plan(plan, config, size, dtype, device, args, head_groups)
            dist.barrier()
            torch._dynamo.reset()  # each plan's blocks are new modules; do not let their compiled graphs pile up
            if rank == 0:
                entry[variant_name(plan, head_groups)] = step_s
                logger.info("%s %s: %.4f s per step", size_name, variant_name(plan, head_groups), step_s)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out["sizes"][size_name] = entry
    return out if rank == 0 else None


def model_table(result: dict, config: dict, world_sizes=(2, 4, 8)) -> dict:
    bw = Bandwidth(**result["bandwidth"])
    table = {}
    for size_name, measured in result["sizes"].items():
        height, width, frames = SIZES[size_name]
        tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
        shape = ModelShape(
            num_layers=config["num_layers"],
            num_heads=config["num_attention_heads"],
            head_dim=config["attention_head_dim"],
            ffn_dim=config["ffn_dim"],
            tokens=tokens,
            bytes_per_element=4 if config is TINY_TRANSFORMER else 2,
        )
        one = measured[str(ParallelPlan())]
        head_groups_measured = sorted({parse_variant(name)[1] for name in measured} - {1})
        rows = {}
        for n in world_sizes:
            plans = [p for p in plans_of(n, shape.num_heads, shape.ffn_dim) if tokens % p.ulysses == 0]
            grouped = grouped_variants(plans, head_groups_measured, shape.num_heads)
            for plan, head_groups in [(plan, 1) for plan in plans] + grouped:
                p = predict(shape, plan, one, bw, head_groups)
                name = variant_name(plan, head_groups)
                rows[name] = {
                    "world_size": n,
                    "predicted_step_s": p.step_s,
                    "predicted_compute_s": p.compute_s,
                    "predicted_comm_s": p.comm_s,
                    "predicted_speedup": one / p.step_s,
                    "measured_step_s": measured.get(name),
                }
        table[size_name] = {"tokens": tokens, "one_gpu_step_s": one, "plans": rows}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a 4-head tiny expert in fp32 at 64x64x9 (smoke test)")
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    parser.add_argument("--attention", default="auto", help="attention kernel (wan_triton.kernels.attention)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks, as served")
    parser.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs around each forward, as served")
    add_head_groups_argument(parser)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bandwidth-mib", type=int, default=None, help="message size of the bandwidth test")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from wan_triton.workers.world import run_world

    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    sizes = args.sizes or (["tiny"] if args.tiny else ["480p", "720p"])
    mib = args.bandwidth_mib or (4 if args.tiny else 256)
    rank_args = {
        "device": args.device,
        "tiny": args.tiny,
        "sizes": sizes,
        "attention": args.attention,
        "repeat": args.repeat,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "ulysses_head_groups": args.ulysses_head_groups,
        "bandwidth_bytes": mib << 20,
    }
    started = time.perf_counter()
    result = run_world(args.world_size, _rank_main, (rank_args,), backend=backend, timeout_s=3600)[0]
    config = TINY_TRANSFORMER if args.tiny else A14B_TRANSFORMER
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result.update(
        device=f"{args.world_size}x {device_name}",
        backend=backend,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        commit=os.environ.get("COMMIT", "unknown"),
        torch=torch.__version__,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d"),
        command=" ".join(sys.argv),
        wall_s=time.perf_counter() - started,
        model=model_table(result, config),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    bw = result["bandwidth"]
    print(
        f"\n{result['device']} ({backend})  commit {result['commit']}  compile {args.compile}  "
        f"cuda graphs {args.cuda_graphs}"
    )
    print(
        "bus bandwidth GB/s: all-reduce {:.1f}, all-to-all {:.1f}, all-gather {:.1f}; latency {:.1f} us".format(
            bw["all_reduce"] / 1e9, bw["all_to_all"] / 1e9, bw["all_gather"] / 1e9, bw["latency_s"] * 1e6
        )
    )
    print(f"{'size':6} {'plan':28} {'ranks':>5} {'measured s':>10} {'model s':>9} {'comm s':>8} {'speedup':>8}")
    for size, entry in result["model"].items():
        print(f"{size:6} {'cfg1xulysses1xtp1':28} {1:5} {entry['one_gpu_step_s']:10.4f} {'':>9} {'':>8} {1:8.2f}")
        for plan, row in entry["plans"].items():
            measured = "-" if row["measured_step_s"] is None else f"{row['measured_step_s']:.4f}"
            print(
                f"{size:6} {plan:28} {row['world_size']:5} {measured:>10} {row['predicted_step_s']:9.4f} "
                f"{row['predicted_comm_s']:8.4f} {row['predicted_speedup']:8.2f}"
            )


if __name__ == "__main__":
    main()
