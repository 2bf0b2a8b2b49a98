"""Parallel plans as the benchmarks measure them, and the model's tables built from their measurements.

A measured variant is a plan, with `+groups<G>` where its Ulysses exchanges run in G head groups. Two benchmarks
feed the analytic model (`wan_bench.perf_model`): `parallel_step.py` measures whole steps on several GPUs (the
model scales the 1-GPU step by FLOP: `model_table`), `parallel_compute.py` measures each plan's per-rank compute on
one GPU (the model adds communication to it: `predictions`).
"""

from __future__ import annotations

import argparse
import re

from wan_bench.experts import SIZES, tokens_of
from wan_bench.perf_model import Bandwidth, ModelShape, flop_scaled_compute, plans_of, predict, predict_from_compute
from wan_triton.config.plan import ParallelPlan


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


PLAN_SIZES = ("480p", "720p", "tiny")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """What a plan benchmark runs: the device, the expert (A14B or tiny), the sizes, and the served path's options
    (attention kernel, precision, regional compile, CUDA graphs, Ulysses head groups)."""
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 4-head tiny expert in fp32 at 64x64x9 (smoke test)")
    parser.add_argument(
        "--sizes", nargs="+", default=None, choices=PLAN_SIZES, help="default: tiny with --tiny, else 480p 720p"
    )
    parser.add_argument("--attention", default="auto", help="attention kernel (wan_triton.kernels.attention)")
    parser.add_argument(
        "--precision",
        choices=["bfloat16", "fp8"],
        default="bfloat16",
        help="the denoiser's precision (fp8: wan_triton.kernels.fp8, on Hopper, not with --tiny)",
    )
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks, as served")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="CUDA graphs around each forward (the deployment's cuda_graphs)"
    )
    parser.add_argument(
        "--ulysses-head-groups",
        nargs="+",
        type=int,
        default=[],
        metavar="G",
        help="also run each Ulysses plan with its exchanges in G head groups (the deployment's ulysses_head_groups)",
    )


def run_sizes(args: argparse.Namespace) -> list[str]:
    """The sizes `add_plan_arguments`' options ask for."""
    return args.sizes or (["tiny"] if args.tiny else ["480p", "720p"])


def model_shape(config: dict, size_name: str, tiny: bool) -> ModelShape:
    """The model's view of an expert at a size; the tiny expert runs in fp32, A14B in bf16."""
    return ModelShape(
        num_layers=config["num_layers"],
        num_heads=config["num_attention_heads"],
        head_dim=config["attention_head_dim"],
        ffn_dim=config["ffn_dim"],
        tokens=tokens_of(SIZES[size_name]),
        bytes_per_element=4 if tiny else 2,
    )


def model_table(result: dict, config: dict, tiny: bool, world_sizes=(2, 4, 8)) -> dict:
    """Per size, every plan of `world_sizes` predicted from the 1-GPU step and the bandwidths of a
    `parallel_step.py` run (FLOP-scaled compute), next to the step measured where the run measured that plan."""
    bw = Bandwidth(**result["bandwidth"])
    table = {}
    for size_name, measured in result["sizes"].items():
        shape = model_shape(config, size_name, tiny)
        one = measured[str(ParallelPlan())]
        head_groups_measured = sorted({parse_variant(name)[1] for name in measured} - {1})
        rows = {}
        for n in world_sizes:
            plans = [p for p in plans_of(n, shape.num_heads, shape.ffn_dim) if shape.tokens % p.ulysses == 0]
            grouped = grouped_variants(plans, head_groups_measured, shape.num_heads)
            for plan, head_groups in [(plan, 1) for plan in plans] + grouped:
                p = predict(shape, plan, one, bw, head_groups)
                rows[variant_name(plan, head_groups)] = {
                    "world_size": n,
                    "predicted_step_s": p.step_s,
                    "predicted_compute_s": p.compute_s,
                    "predicted_comm_s": p.comm_s,
                    "predicted_speedup": one / p.step_s,
                    "measured_step_s": measured.get(variant_name(plan, head_groups)),
                }
        table[size_name] = {"tokens": shape.tokens, "one_gpu_step_s": one, "plans": rows}
    return table


def exchange_stand_in_s(measured_size: dict) -> float:
    """Seconds of a step that the all-to-all stand-ins' device-to-device copies took, where a profile counted them
    (0 without one): on real GPUs that time is NCCL's, which the model adds as communication, so the compute the
    model uses leaves it out. Before commit c33a611 the stand-in was traced into the compiled blocks and fused
    into the layout copies, so no separate copies were counted."""
    return measured_size.get("profile", {}).get("memcpy_dtod_ms", 0.0) / 1e3


def predictions(measured: dict, config: dict, bw: Bandwidth, tiny: bool) -> dict:
    """From a `parallel_compute.py` run, per size and plan: measured compute, predicted step, and where the 1-GPU
    step was measured at that size (the speedups' baseline) the FLOP-scaled compute (model assumption 1) and the
    speedup; without it those are None."""
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
