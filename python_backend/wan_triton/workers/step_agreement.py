"""Stopping a parallel request mid-loop (cancelled, past its deadline): the ranks agree after every step.

The supervisor (`group._Supervisor`) learns that a request must stop from its step hook, which raises, and then
sets a flag that every worker process shares. A rank cannot act on the flag alone: a peer that read it a moment
earlier would go on into the next step and wait in its collectives for a rank that has left. So after every step
each rank puts what it sees into an all-reduce (max) and all of them get the same answer after the same step.

The all-reduce runs over a gloo group of its own, on the CPU: on a GPU group it neither waits for the device nor
enters a captured CUDA graph. It costs about a millisecond a step or less (`benchmarks/stop_agreement_cost.py`;
figures in benchmarks/RESULTS.md) against seconds of compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StopRequested(Exception):
    """Every rank of the group agreed to stop the request after `steps_done` steps."""

    def __init__(self, steps_done: int) -> None:
        super().__init__(f"stopped by the supervisor after step {steps_done}")
        self.steps_done = steps_done


class StepAgreement:
    """`check(steps_done)` raises StopRequested on every rank at once when any rank saw the stop flag set."""

    def __init__(self, flag) -> None:
        # `flag`: a multiprocessing Event shared with the supervisor. Each rank creates the group, in the same
        # order as its other groups (torch.distributed's rule for new_group).
        self.flag = flag
        self.group = dist.new_group(backend="gloo")

    def check(self, steps_done: int) -> None:
        seen = torch.tensor([1 if self.flag.is_set() else 0], dtype=torch.int32)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=self.group)
        if seen.item():
            raise StopRequested(steps_done)
