"""Per-rank compute of every parallel plan, measured on ONE GPU, and the step times the model predicts from it.

One GPU can measure this because the ranks of a plan are symmetric: each cfg rank runs a batch of 1, each ulysses
rank 1/U of the tokens (attention: all tokens, 1/U of the heads), each tp rank 1/T of the heads and FFN columns. So
rank 0's work is the plan's compute per step. This script runs rank 0 of each plan alone, in torch.distributed's
fake process group, with its all-to-all and all-gather replaced by local copies of this rank's data
(`wan_bench.fake_world`: attention on unwritten memory can run faster than on real data), through the code the
workers run (`parallel.sharding.parallelize`, `denoise_step` with `CfgParallel`), so the time is compute (matmuls,
attention, norms, the layout copies around each all-to-all, the solver update) plus the all-to-alls' local copies.
With `--profile` those copies are counted apart and the model leaves them out, as NCCL's time replaces them on real
GPUs; without it they stay in (a small share of a Ulysses rank's step: benchmarks/RESULTS.md).

The model (`wan_bench.perf_model`) then adds communication from bus bandwidths given on the command line, by
default NCCL's bus bandwidths measured on 2x H200 (NV18; benchmarks/RESULTS.md). Printed per plan: measured
compute, the model's compute (the 1-GPU step scaled by the rank's matmul FLOP: its assumption 1, checked here),
predicted communication and step, and each rank's weight memory (one expert; a parallel plan keeps both experts
resident, so twice that).

    python benchmarks/parallel_compute.py --sizes 480p --world-sizes 2 4 8 --out $OUT/compute_480p.json
    python benchmarks/parallel_compute.py --sizes 720p --precision fp8 --compile --out $OUT/compute_fp8_720p.json
    python benchmarks/parallel_compute.py --device cpu --tiny --out out/compute_tiny.json     # smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from wan_bench.experts import (
    SIZES,
    build_rank_expert,
    expert_of,
    guided_step,
    served_engine,
    step_inputs,
)
from wan_bench.fake_world import fake_world, value_preserving_collectives
from wan_bench.memory import allocated, peak_above, release, reset_peak
from wan_bench.perf_model import Bandwidth, plans_of
from wan_bench.plans import (
    add_plan_arguments,
    grouped_variants,
    model_shape,
    parse_variant,
    predictions,
    run_sizes,
    variant_name,
)
from wan_bench.profiling import is_device_copy, is_layout_copy, profile_kernels, top_kernels
from wan_bench.records import device_name, run_record, write_json
from wan_bench.timing import time_wall
from wan_triton.config.plan import ParallelPlan
from wan_triton.kernels import attention

logger = logging.getLogger("benchmarks.parallel_compute")

MIB_512 = 512 << 20
# NCCL bf16 on 2x H200 (NV18), 512 MiB per rank: the time of one call. Bus bandwidth = bytes x factor / time
# (NCCL-tests' convention): all-to-all (n-1)/n, all-reduce 2(n-1)/n, n = 2.
NV18_ALL_TO_ALL = MIB_512 * 0.5 / 0.91e-3
NV18_ALL_REDUCE = MIB_512 * 1.0 / 1.69e-3


def _time_size(engine, cfg_parallel, config: dict, size: tuple[int, int, int], args, device, warmup: int = 1) -> dict:
    """Guided steps (`wan_bench.experts.guided_step`) at one size, this process alone, after `warmup` untimed ones
    (the first compiles; a CUDA-graph engine captures on its third forward)."""
    step = guided_step(engine, cfg_parallel, *step_inputs(config, size, device, engine.dtype))
    for _ in range(warmup - 1):
        step()
    memory = {}

    def after_warmup():  # peak memory of the timed steps only, above what the warm-up left allocated
        memory["base"] = reset_peak(device)

    warmup_s, times = time_wall(step, device, args.repeat, after_warmup)  # the warm-up includes compilation
    peak = peak_above(device, memory["base"])
    entry = {"compute_s": statistics.median(times), "times": times, "warmup_s": warmup_s, "peak_activation_bytes": peak}
    if args.profile:
        entry["profile"] = profile_step(step, device, args.profile, statistics.median(times))
    return entry


def profile_step(step, device: torch.device, steps: int, step_s: float) -> dict:
    """Where one step's time goes on the GPU: kernel ms by category (`wan_bench.profiling.kernel_category`), the
    kernels that only move data, the top kernels, and the step's time not covered by any kernel (launch gaps, host
    syncs)."""
    if device.type != "cuda":
        return {}
    kernels, by_category = profile_kernels(step, steps)
    kernel_ms = sum(by_category.values())
    return {
        "steps": steps,
        "kernel_ms_by_category": by_category,
        "kernel_ms_total": kernel_ms,
        "layout_copy_ms": sum(ms for name, (ms, _) in kernels.items() if is_layout_copy(name)),
        # The all-to-all stand-ins' copies (and any other device-to-device memcpy): on real GPUs, NCCL's time. A
        # replayed CUDA graph shows them as the driver's memcpy kernels, one per stand-in a layer.
        "memcpy_dtod_ms": sum(ms for name, (ms, _) in kernels.items() if is_device_copy(name)),
        "step_ms_not_in_kernels": step_s * 1e3 - kernel_ms,
        "top_kernels": top_kernels(kernels, steps, 40, "launches_per_step"),
    }


def measure_plan(plan: ParallelPlan, config: dict, sizes: list[str], args, device, dtype, head_groups: int = 1) -> dict:
    """Rank 0's step seconds at each size, its weight bytes (one expert) and its peak memory; `head_groups`: the
    Ulysses exchanges in that many head groups (the deployment's ulysses_head_groups)."""
    from wan_triton.parallel.cfg import CfgParallel
    from wan_triton.parallel.process_groups import create_groups

    with fake_world(plan.world_size):
        try:
            groups = create_groups(plan)
            base = allocated(device)
            module = build_rank_expert(plan, groups, config, dtype, device, args.attention, head_groups, args.precision)
            if args.no_chunked_qk:  # the earlier Ulysses Q/K layout (normalise, rotate, copy), for a side-by-side run
                for processor in module.attn_processors.values():
                    processor.chunked_qk = False
            release(device)
            weight_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
            allocated_bytes = allocated(device) - base  # on cuda: what the rank's device really holds after the cut
            engine = served_engine(module, plan, device, dtype, args.compile, cuda_graphs=args.cuda_graphs)
            cfg_parallel = None if groups.cfg is None else CfgParallel(groups.cfg, groups.coords.cfg)
            entry: dict = {
                "world_size": plan.world_size,
                "weight_bytes_per_expert": weight_bytes,
                "allocated_bytes_after_load": allocated_bytes if device.type == "cuda" else None,
                "sizes": {},
            }
            for size_name in sizes:
                warmup = 3 if args.cuda_graphs else 1  # a step is one forward (guidance as batch, or one per cfg rank)
                size = SIZES[size_name]
                entry["sizes"][size_name] = _time_size(engine, cfg_parallel, config, size, args, device, warmup)
                release(device)
                logger.info(
                    "%s %s: %.4f s compute per step, %.2f GB weights per expert",
                    size_name,
                    variant_name(plan, head_groups),
                    entry["sizes"][size_name]["compute_s"],
                    weight_bytes / 1e9,
                )
            del engine, module, cfg_parallel
            release(device)
            return entry
        finally:
            torch._dynamo.reset()  # each plan's blocks are new modules; do not let their graphs pile up


def _or_dash(value: float | None, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{decimals}f}"


def print_table(result: dict) -> None:
    bw = result["bandwidth"]
    print(f"\n{result['device']}  compile {result['compile']}  CUDA graphs {result.get('cuda_graphs', False)}")
    print(
        f"bus bandwidth assumed GB/s: all-reduce {bw['all_reduce'] / 1e9:.0f}, all-to-all "
        f"{bw['all_to_all'] / 1e9:.0f}, all-gather {bw['all_gather'] / 1e9:.0f}; "
        f"{result['latency_s'] * 1e6:.0f} us per call"
    )
    header = f"{'size':6} {'plan':28} {'gpus':>4} {'compute s':>9} {'stand-in':>8} {'flop-model':>10} {'comm s':>7} "
    print(header + f"{'step s':>7} {'speedup':>7} {'GB/expert':>9}")
    for size_name, entry in result["model"].items():
        for plan_name, row in entry["plans"].items():
            print(
                f"{size_name:6} {plan_name:28} {row['world_size']:4} {row['measured_compute_s']:9.4f} "
                f"{row.get('exchange_stand_in_s', 0.0):8.4f} "
                f"{_or_dash(row['flop_scaled_compute_s'], 10, 4)} {row['predicted_comm_s']:7.4f} "
                f"{row['predicted_step_s']:7.4f} {_or_dash(row['predicted_speedup'], 7, 2)} "
                f"{row['weight_gb_per_expert']:9.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_arguments(parser)
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument(
        "--plans", nargs="+", default=None, help="only these plans (e.g. cfg2xulysses4xtp1, cfg2xulysses4xtp1+groups2)"
    )
    parser.add_argument(
        "--no-chunked-qk", action="store_true", help="Ulysses: normalise and rotate Q, K, then copy into chunk order"
    )
    parser.add_argument(
        "--no-ffn-epilogue", action="store_true", help="diffusers' separate FFN GELU (no wan_triton.kernels.ffn)"
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile this many steps (kernel time by kind; the model then leaves the all-to-all copies out)",
    )
    parser.add_argument("--all-to-all-gbps", type=float, default=NV18_ALL_TO_ALL / 1e9, help="bus bandwidth")
    parser.add_argument("--all-reduce-gbps", type=float, default=NV18_ALL_REDUCE / 1e9, help="bus bandwidth")
    parser.add_argument(
        "--all-gather-gbps", type=float, default=None, help="bus bandwidth (default: the all-to-all figure)"
    )
    parser.add_argument("--latency-us", type=float, default=20.0, help="fixed cost of one collective call")
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, help="measure nothing: join these runs' results (JSON)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config, dtype = expert_of(args.tiny)
    bw = Bandwidth(
        all_reduce=args.all_reduce_gbps * 1e9,
        all_to_all=args.all_to_all_gbps * 1e9,
        all_gather=(args.all_gather_gbps or args.all_to_all_gbps) * 1e9,
        latency_s=args.latency_us * 1e-6,
    )
    result = {
        "bandwidth": {"all_reduce": bw.all_reduce, "all_to_all": bw.all_to_all, "all_gather": bw.all_gather},
        "latency_s": bw.latency_s,
    }
    if args.merge:
        runs = [json.loads(path.read_text()) for path in args.merge]
        settings = {
            (r["device"], r["compile"], r.get("cuda_graphs", False), r.get("precision", "bfloat16")) for r in runs
        }
        if len(settings) > 1:
            raise SystemExit(
                "--merge: the runs differ in device, compile, CUDA graphs or precision; their figures do not mix"
            )
        first = runs[0]
        result = {
            **run_record(first["device"]),
            **result,
            "compile": first["compile"],
            "cuda_graphs": first.get("cuda_graphs", False),
            "precision": first.get("precision", "bfloat16"),
            "measured": {},
            "runs": [],
        }
        for path, run in zip(args.merge, runs, strict=True):
            # Older runs say "date" where newer ones say "timestamp".
            keys = ("commit", "timestamp", "date", "command", "torch", "wall_s")
            result["runs"].append({k: run[k] for k in keys if k in run} | {"file": path.name})
            for plan_name, entry in run["measured"].items():
                merged = result["measured"].setdefault(plan_name, dict(entry, sizes={}))
                merged["sizes"].update(entry["sizes"])
        result["model"] = predictions(result["measured"], config, bw, args.tiny)
        write_json(args.out, result)
        print_table(result)
        return

    device = torch.device(args.device)
    if args.no_ffn_epilogue:
        from wan_triton.kernels import ffn

        ffn.install = lambda module: 0  # for a side-by-side run against the served FFN
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sizes = run_sizes(args)
    if args.plans:
        variants = [parse_variant(name) for name in args.plans]
    else:
        variants = [(ParallelPlan(), 1)]
        for n in args.world_sizes:
            variants += [(plan, 1) for plan in plans_of(n, config["num_attention_heads"], config["ffn_dim"])]
    ungrouped = [plan for plan, groups in variants if groups == 1]
    variants += grouped_variants(ungrouped, args.ulysses_head_groups, config["num_attention_heads"])
    for size_name in sizes:
        tokens = model_shape(config, size_name, args.tiny).tokens
        variants = [(p, g) for p, g in variants if tokens % p.ulysses == 0]
    result = {
        **run_record(f"1x {device_name(device)} (rank 0 of each plan, fake process group)"),
        **result,
        "attention": attention.resolve(args.attention, device, config["attention_head_dim"]).value,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "precision": args.precision,
        "ffn_epilogue": not args.no_ffn_epilogue,
        "chunked_qk": not args.no_chunked_qk,
        "measured": {},
    }
    started = time.perf_counter()
    for plan, head_groups in variants:
        with value_preserving_collectives():
            entry = measure_plan(plan, config, sizes, args, device, dtype, head_groups)
            result["measured"][variant_name(plan, head_groups)] = entry
        result["wall_s"] = time.perf_counter() - started
        write_json(args.out, result)  # a run cut short keeps the plans it finished
    result["model"] = predictions(result["measured"], config, bw, args.tiny)
    write_json(args.out, result)
    print_table(result)


if __name__ == "__main__":
    main()
