"""What the ranks' stop agreement (`wan_triton.workers.step_agreement.StepAgreement.check`, one per denoising step)
costs: a 4-byte gloo all-reduce between local processes, timed per call for groups of 2, 4 and 8.

    python benchmarks/stop_agreement_cost.py --world-sizes 2 4 8 --calls 2000
"""

from __future__ import annotations

import argparse
import statistics
import time


def _time_checks(rank: int, calls: int) -> float:
    """Microseconds per check on this rank, the flag clear (the common case: the request goes on)."""
    import multiprocessing as mp

    import torch.distributed as dist

    from wan_triton.workers.step_agreement import StepAgreement

    agreement = StepAgreement(mp.get_context("spawn").Event())
    for _ in range(100):  # warm-up: connections, first calls
        agreement.check(0)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(calls):
        agreement.check(0)
    return (time.perf_counter() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    from wan_triton.workers.world import run_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    for world_size in args.world_sizes:
        per_rank = run_world(world_size, _time_checks, (args.calls,))
        print(f"{world_size} processes: {statistics.median(per_rank):.1f} us per check (median of the ranks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
