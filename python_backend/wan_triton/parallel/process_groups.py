"""The torch.distributed groups of one plan, created collectively by every rank of the default group."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from wan_triton.config.plan import ParallelPlan, RankCoords


@dataclass(frozen=True)
class PlanGroups:
    """This rank's place in the plan. A group is None where its size is 1 (no communication)."""

    plan: ParallelPlan
    rank: int
    coords: RankCoords
    cfg: dist.ProcessGroup | None
    ulysses: dist.ProcessGroup | None
    tp: dist.ProcessGroup | None


def create_groups(plan: ParallelPlan) -> PlanGroups | None:
    """Create every group of `plan` over global ranks [0, plan.world_size).

    Every rank of the default group must call this, in the same order (torch.distributed's rule for new_group),
    also ranks beyond the plan's world size (a test can run a smaller plan inside a larger world); those get None.
    """
    rank = dist.get_rank()
    mine: dict[str, dist.ProcessGroup | None] = {}
    for kind, groups in plan.group_ranks().items():
        mine[kind] = None
        for ranks in groups:
            if len(ranks) == 1:
                continue
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    if rank >= plan.world_size:
        return None
    return PlanGroups(plan, rank, plan.coords(rank), mine["cfg"], mine["ulysses"], mine["tp"])
