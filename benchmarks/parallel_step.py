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

    python benchmarks/parallel_step.py --sizes 480p 720p --compile --out $OUT/parallel_step.json   # 2 GPUs
    python benchmarks/parallel_step.py --device cpu --backend gloo --tiny --out out/parallel_tiny.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from wan_bench.experts import (
    SIZES,
    build_rank_expert,
    expert_of,
    guided_step,
    served_engine,
    step_inputs,
)
from wan_bench.perf_model import plans_of
from wan_bench.plans import add_plan_arguments, grouped_variants, model_table, run_sizes, variant_name
from wan_bench.records import device_name, run_record, write_json
from wan_bench.timing import time_slowest_rank, time_wall
from wan_triton.config.plan import ParallelPlan

logger = logging.getLogger("benchmarks.parallel_step")


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
        result[kind] = nbytes * factor / time_slowest_rank(fn, device, repeat)
    small = torch.zeros(256, device=device, dtype=dtype)
    result["latency_s"] = time_slowest_rank(lambda: [dist.all_reduce(small) for _ in range(20)], device, repeat) / 20
    return result


def _time_plan(plan, config, size, dtype, device, args: dict, head_groups: int = 1):
    """Median step seconds of `plan` on the ranks it uses (None on the others)."""
    from wan_triton.parallel.cfg import CfgParallel
    from wan_triton.parallel.process_groups import create_groups

    groups = create_groups(plan)  # the 1-GPU baseline: rank 0 alone; the other ranks wait at the next barrier
    if groups is None:
        return None
    repeat = args["repeat"]
    module = build_rank_expert(plan, groups, config, dtype, device, args["attention"], head_groups, args["precision"])
    engine = served_engine(module, plan, device, dtype, args["compile"], args["cuda_graphs"])
    cfg_parallel = None if groups.cfg is None else CfgParallel(groups.cfg, groups.coords.cfg)
    step = guided_step(engine, cfg_parallel, *step_inputs(config, size, device, dtype))
    if plan.world_size > 1:
        return time_slowest_rank(step, device, repeat)
    return statistics.median(time_wall(step, device, repeat)[1])  # alone, so no barrier


def _rank_main(rank: int, args: dict) -> dict | None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(message)s")
    device = torch.device("cuda", rank) if args["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    config, dtype = expert_of(args["tiny"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_arguments(parser)
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bandwidth-mib", type=int, default=None, help="message size of the bandwidth test")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from wan_triton.workers.world import run_world

    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    sizes = run_sizes(args)
    mib = args.bandwidth_mib or (4 if args.tiny else 256)
    rank_args = {
        "device": args.device,
        "tiny": args.tiny,
        "sizes": sizes,
        "attention": args.attention,
        "precision": args.precision,
        "repeat": args.repeat,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "ulysses_head_groups": args.ulysses_head_groups,
        "bandwidth_bytes": mib << 20,
    }
    started = time.perf_counter()
    result = run_world(args.world_size, _rank_main, (rank_args,), backend=backend, timeout_s=3600)[0]
    config, _ = expert_of(args.tiny)
    result = {
        **run_record(f"{args.world_size}x {device_name(args.device)}"),
        **result,
        "backend": backend,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "precision": args.precision,
        "wall_s": time.perf_counter() - started,
        "model": model_table(result, config, args.tiny),
    }
    write_json(args.out, result)

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
