"""Per-rank compute of every parallel plan, measured on ONE GPU, and the step times the model predicts from it.

One GPU can measure this because the ranks of a plan are symmetric: each cfg rank runs a batch of 1, each ulysses
rank 1/U of the tokens (attention: all tokens, 1/U of the heads), each tp rank 1/T of the heads and FFN columns. So
rank 0's work is the plan's compute per step. This script runs rank 0 of each plan alone, in torch.distributed's
fake process group (`torch.testing._internal.distributed.fake_pg`: every collective returns at once and moves
nothing), with its all-to-all and all-gather replaced by local copies of this rank's data
(`value_preserving_collectives`: attention on unwritten memory can run faster than on real data), through the code
the workers run (`parallel.model.parallelize`, `denoise_step` with `CfgParallel`), so the time is compute
(matmuls, attention, norms, the layout copies around each all-to-all, the solver update) plus the all-to-alls'
local copies. With `--profile` those copies are counted apart and the model leaves them out, as NCCL's time
replaces them on real GPUs; without it they stay in (about 1% of a Ulysses rank's step at 720p).

The model (`wan_bench.perf_model`) then adds communication from bus bandwidths given on the command
line, by default the NCCL figures measured on 2x H200 NV18 (BASELINES.md: all-to-all 295 GB/s, all-reduce
318 GB/s). Printed per plan: measured compute, the model's compute (the 1-GPU step scaled by the rank's matmul
FLOP: its assumption 1, checked here), predicted communication and step, and each rank's weight memory (one
expert; a parallel plan keeps both experts resident, so twice that).

    python benchmarks/parallel_compute.py --sizes 480p --world-sizes 2 4 8 --out $OUT/compute_480p.json
    python benchmarks/parallel_compute.py --device cpu --tiny --out out/compute_tiny.json     # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from parallel_step import (  # noqa: E402
    SIZES,
    TINY_TRANSFORMER,
    add_head_groups_argument,
    build_rank_expert,
    grouped_variants,
    guided_step,
    parse_variant,
    served_engine,
    time_alone,
    variant_name,
)
from wan_bench.perf_model import Bandwidth, ModelShape, flop_scaled_compute, plans_of, predict_from_compute  # noqa: E402
from wan_build.shapes_checkpoint import A14B_TRANSFORMER  # noqa: E402
from wan_triton.config.plan import ParallelPlan  # noqa: E402
from wan_triton.kernels import attention  # noqa: E402

logger = logging.getLogger("benchmarks.parallel_compute")

MIB_512 = 512 << 20
# BASELINES.md, "Interconnect (2x H200, NV18)": NCCL bf16, 512 MB per rank. Bus bandwidth = bytes x factor / time
# (NCCL-tests' convention): all-to-all (n-1)/n, all-reduce 2(n-1)/n, n = 2.
NV18_ALL_TO_ALL = MIB_512 * 0.5 / 0.91e-3
NV18_ALL_REDUCE = MIB_512 * 1.0 / 1.69e-3


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


@torch.library.custom_op("wan_bench::exchange_stand_in", mutates_args=("output",))
def _exchange_stand_in(output: torch.Tensor, input_: torch.Tensor) -> None:
    """The local copy standing in for an all-to-all, as an op the compiler cannot see into: like NCCL's, its input
    is a buffer the compiled code must write first, and its copy cannot be merged into the kernel that produces the
    input. (A plain `copy_` was traced into the compiled blocks, where inductor fused it with the layout copy
    before it, so the copy wrote straight into the all-to-all's output and a change that removes the layout copy
    could not show.) Same-dtype and contiguous, the copy runs as a device-to-device memcpy, which `profile_step`
    counts apart."""
    output.copy_(input_)


def _all_to_all_single_stand_in(output, input_, *args, **kwargs):
    """Every chunk comes back from this rank: real values, this rank's own data (the fake group's all-to-all
    would leave `output` unwritten, and attention on unwritten memory ran 17% faster than on real data on an
    H100 with FlashAttention-4; presumably its online softmax skips rescales while a row's maximum holds)."""
    _exchange_stand_in(output, input_)


def _start_all_to_all_stand_in(chunks: torch.Tensor, group) -> torch.Tensor:
    """`ulysses._start_all_to_all` (head groups) as the same local copy, done at once: one GPU cannot show the
    overlap, only the compute that grouping costs."""
    chunks = chunks.contiguous()
    output = torch.empty_like(chunks)
    _exchange_stand_in(output, chunks)
    return output


def _all_gather_stand_in(tensor_list, tensor, *args, **kwargs):
    """Every rank's part is a copy of this rank's (the next step's input stays finite and realistic)."""
    for part in tensor_list:
        part.copy_(tensor)


@contextlib.contextmanager
def value_preserving_collectives():
    """The fake group's all-to-all and all-gather, replaced for the time of a measurement by local copies that
    fill their outputs with this rank's data. The copies are timed with the compute (a local copy of each
    all-to-all's tensor: ~0.1 ms for 190 MB on an H100). all-reduce stays the fake no-op: the tensor keeps this
    rank's partial sum, a realistic value."""
    from wan_triton.parallel import ulysses

    saved = dist.all_to_all_single, dist.all_gather, ulysses._start_all_to_all, ulysses._wait
    dist.all_to_all_single, dist.all_gather = _all_to_all_single_stand_in, _all_gather_stand_in
    ulysses._start_all_to_all, ulysses._wait = _start_all_to_all_stand_in, lambda tensor: tensor
    try:
        yield
    finally:
        dist.all_to_all_single, dist.all_gather, ulysses._start_all_to_all, ulysses._wait = saved


def _rank0_of(plan: ParallelPlan):
    """Join a fake world of the plan's size as rank 0 and create the plan's groups in it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from wan_triton.parallel.process_groups import create_groups

    dist.init_process_group("fake", rank=0, world_size=plan.world_size, store=FakeStore())
    return create_groups(plan)


def _time_size(engine, cfg_parallel, config: dict, size: tuple[int, int, int], args, device, warmup: int = 1) -> dict:
    """Guided steps (`parallel_step.guided_step`) at one size, this process alone, after `warmup` untimed ones (the
    first compiles; a CUDA-graph engine captures on its third forward)."""
    step = guided_step(engine, cfg_parallel, config, size, device, engine.dtype)
    for _ in range(warmup - 1):
        step()
    memory = {}

    def after_warmup():  # peak memory of the timed steps only, above what the warm-up left allocated
        memory["base"] = _allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    warmup_s, times = time_alone(step, device, args.repeat, after_warmup)  # the warm-up includes compilation
    peak = torch.cuda.max_memory_allocated(device) - memory["base"] if device.type == "cuda" else None
    entry = {"compute_s": statistics.median(times), "times": times, "warmup_s": warmup_s, "peak_activation_bytes": peak}
    if args.profile:
        entry["profile"] = profile_step(step, device, args.profile, statistics.median(times))
    return entry


def _is_layout_copy(name: str) -> bool:
    """A kernel that only moves data (a heuristic on names: inductor's `clone` kernels, ATen's copy and cat
    kernels; not `_to_copy`, a cast that inductor fuses into norms, and not the memcpys, which `memcpy_dtod_ms`
    counts)."""
    low = name.lower()
    return any(key in low for key in ("clone", "direct_copy", "catarray"))


def is_device_copy(name: str) -> bool:
    """A device-to-device memcpy as the profiler names it: "Memcpy DtoD (Device -> Device)", or the driver's copy
    kernel "memcpy128" (and its kin), which the same copies of a replayed CUDA graph appeared as at commit 504ab62
    (160 launches a cfg2 x ulysses4 step: the 4 all-to-all stand-ins of 40 layers)."""
    return name.startswith("Memcpy DtoD") or re.fullmatch(r"memcpy\d+", name) is not None


def profile_step(step, device: torch.device, steps: int, step_s: float) -> dict:
    """Where one step's time goes on the GPU: kernel ms by category (`block_profile.kernel_category`), the kernels
    that only move data, the top kernels, and the step's time not covered by any kernel (launch gaps, host syncs)."""
    from torch.profiler import ProfilerActivity, profile

    from block_profile import kernel_category, kernel_times

    if device.type != "cuda":
        return {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
    kernels, by_category = kernel_times(prof, steps)
    kernel_ms = sum(by_category.values())
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:40]
    return {
        "steps": steps,
        "kernel_ms_by_category": by_category,
        "kernel_ms_total": kernel_ms,
        "layout_copy_ms": sum(ms for name, (ms, _) in kernels.items() if _is_layout_copy(name)),
        # The all-to-all stand-ins' copies (and any other device-to-device memcpy): on real GPUs, NCCL's time.
        "memcpy_dtod_ms": sum(ms for name, (ms, _) in kernels.items() if is_device_copy(name)),
        "step_ms_not_in_kernels": step_s * 1e3 - kernel_ms,
        "top_kernels": [
            {"name": name[:160], "ms": ms, "launches_per_step": n // steps, "category": kernel_category(name)}
            for name, (ms, n) in top
        ],
    }


def measure_plan(plan: ParallelPlan, config: dict, sizes: list[str], args, device, dtype, head_groups: int = 1) -> dict:
    """Rank 0's step seconds at each size, its weight bytes (one expert) and its peak memory; `head_groups`: the
    Ulysses exchanges in that many head groups (the deployment's ulysses_head_groups)."""
    from wan_triton.parallel.cfg import CfgParallel

    groups = _rank0_of(plan)
    try:
        base = _allocated(device)
        module = build_rank_expert(plan, groups, config, dtype, device, args.attention, head_groups)
        if args.no_chunked_qk:  # the earlier Ulysses Q/K layout (normalise, rotate, copy), for a side-by-side run
            for processor in module.attn_processors.values():
                processor.chunked_qk = False
        _free(device)
        weight_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        allocated_bytes = _allocated(device) - base  # on cuda: what the rank's device really holds after the cut
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
            entry["sizes"][size_name] = _time_size(engine, cfg_parallel, config, SIZES[size_name], args, device, warmup)
            _free(device)
            logger.info(
                "%s %s: %.4f s compute per step, %.2f GB weights per expert",
                size_name,
                variant_name(plan, head_groups),
                entry["sizes"][size_name]["compute_s"],
                weight_bytes / 1e9,
            )
        del engine, module, cfg_parallel
        _free(device)
        return entry
    finally:
        torch._dynamo.reset()  # each plan's blocks are new modules; do not let their graphs pile up
        dist.destroy_process_group()


def model_shape(config: dict, size_name: str, tiny: bool) -> ModelShape:
    height, width, frames = SIZES[size_name]
    return ModelShape(
        num_layers=config["num_layers"],
        num_heads=config["num_attention_heads"],
        head_dim=config["attention_head_dim"],
        ffn_dim=config["ffn_dim"],
        tokens=((frames - 1) // 4 + 1) * (height // 16) * (width // 16),
        bytes_per_element=4 if tiny else 2,
    )


def exchange_stand_in_s(measured_size: dict) -> float:
    """Seconds of a step that the all-to-all stand-ins' device-to-device copies took, where a profile counted them
    (0 without one): on real GPUs that time is NCCL's, which the model adds as communication, so the compute the
    model uses leaves it out. Before commit c33a611 the stand-in was traced into the compiled blocks and fused
    into the layout copies, so no separate copies were counted."""
    return measured_size.get("profile", {}).get("memcpy_dtod_ms", 0.0) / 1e3


def predictions(measured: dict, config: dict, bw: Bandwidth, tiny: bool) -> dict:
    """Per size and plan: measured compute, predicted step, and where the 1-GPU step was measured at that size (the
    speedups' baseline) the FLOP-scaled compute (model assumption 1) and the speedup; without it those are None."""
    table = {}
    one_gpu = measured.get(str(ParallelPlan()), {}).get("sizes", {})
    sizes = dict.fromkeys(size for entry in measured.values() for size in entry["sizes"])
    for size_name in sizes:
        shape = model_shape(config, size_name, tiny)
        one = one_gpu[size_name]["compute_s"] if size_name in one_gpu else None
        rows = {}
        for plan_name, entry in measured.items():
            if size_name not in entry["sizes"]:
                continue
            plan, head_groups = parse_variant(plan_name)
            measured_size = entry["sizes"][size_name]
            stand_in = exchange_stand_in_s(measured_size) if plan.ulysses > 1 else 0.0  # only Ulysses has all-to-alls
            compute = measured_size["compute_s"] - stand_in
            p = predict_from_compute(shape, plan, compute, bw, head_groups)
            rows[plan_name] = {
                "world_size": plan.world_size,
                "measured_compute_s": measured_size["compute_s"],
                "exchange_stand_in_s": stand_in,
                "compute_s": compute,
                "flop_scaled_compute_s": None if one is None else flop_scaled_compute(shape, plan, one),
                "predicted_comm_s": p.comm_s,
                "predicted_step_s": p.step_s,
                "predicted_speedup": None if one is None else one / p.step_s,
                "weight_gb_per_expert": entry["weight_bytes_per_expert"] / 1e9,
            }
        rows = dict(sorted(rows.items(), key=lambda kv: (kv[1]["world_size"], kv[0])))
        table[size_name] = {"tokens": shape.tokens, "one_gpu_step_s": one, "plans": rows}
    return table


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
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 4-head tiny expert in fp32 at 64x64x9 (smoke test)")
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument(
        "--plans", nargs="+", default=None, help="only these plans (e.g. cfg2xulysses4xtp1, cfg2xulysses4xtp1+groups2)"
    )
    parser.add_argument("--attention", default="auto", help="attention kernel (wan_triton.kernels.attention)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks, as served")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="CUDA graphs around each forward (the deployment's cuda_graphs)"
    )
    parser.add_argument(
        "--no-chunked-qk", action="store_true", help="Ulysses: normalise and rotate Q, K, then copy into chunk order"
    )
    parser.add_argument(
        "--no-ffn-epilogue", action="store_true", help="diffusers' separate FFN GELU (no wan_triton.kernels.ffn)"
    )
    add_head_groups_argument(parser)
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
    config = TINY_TRANSFORMER if args.tiny else A14B_TRANSFORMER
    bw = Bandwidth(
        all_reduce=args.all_reduce_gbps * 1e9,
        all_to_all=args.all_to_all_gbps * 1e9,
        all_gather=(args.all_gather_gbps or args.all_to_all_gbps) * 1e9,
        latency_s=args.latency_us * 1e-6,
    )
    result = {
        "command": " ".join(sys.argv),
        "bandwidth": {"all_reduce": bw.all_reduce, "all_to_all": bw.all_to_all, "all_gather": bw.all_gather},
        "latency_s": bw.latency_s,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        runs = [json.loads(path.read_text()) for path in args.merge]
        if len({(r["device"], r["compile"], r.get("cuda_graphs", False)) for r in runs}) > 1:
            raise SystemExit("--merge: the runs differ in device, compile or CUDA graphs; their figures do not mix")
        first = runs[0]
        result.update(
            device=first["device"], compile=first["compile"], cuda_graphs=first.get("cuda_graphs", False), measured={}
        )
        result["runs"] = []
        for path, run in zip(args.merge, runs, strict=True):
            keys = ("commit", "date", "command", "torch", "wall_s")
            result["runs"].append({k: run[k] for k in keys} | {"file": path.name})
            for plan_name, entry in run["measured"].items():
                merged = result["measured"].setdefault(plan_name, dict(entry, sizes={}))
                merged["sizes"].update(entry["sizes"])
        result["model"] = predictions(result["measured"], config, bw, args.tiny)
        args.out.write_text(json.dumps(result, indent=2))
        print_table(result)
        return

    device = torch.device(args.device)
    if args.no_ffn_epilogue:
        from wan_triton.kernels import ffn

        ffn.install = lambda module: 0  # for a side-by-side run against the served FFN
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sizes = args.sizes or (["tiny"] if args.tiny else ["480p", "720p"])
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
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result.update(
        device=f"1x {device_name} (rank 0 of each plan, fake process group)",
        commit=os.environ.get("COMMIT", "unknown"),
        torch=torch.__version__,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d"),
        attention=attention.resolve(args.attention, device, config["attention_head_dim"]).value,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        ffn_epilogue=not args.no_ffn_epilogue,
        chunked_qk=not args.no_chunked_qk,
        measured={},
    )
    started = time.perf_counter()
    for plan, head_groups in variants:
        with value_preserving_collectives():
            entry = measure_plan(plan, config, sizes, args, device, dtype, head_groups)
            result["measured"][variant_name(plan, head_groups)] = entry
        result["wall_s"] = time.perf_counter() - started
        args.out.write_text(json.dumps(result, indent=2))  # a run cut short keeps the plans it finished
    result["model"] = predictions(result["measured"], config, bw, args.tiny)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)


if __name__ == "__main__":
    main()
