"""Rank 0 of a parallel plan, alone on one device: torch.distributed's fake process group, with the collectives
that would leave outputs unwritten replaced by local copies of this rank's data.

The ranks of a plan are symmetric, so rank 0's work is the plan's compute. In the fake group
(`torch.testing._internal.distributed.fake_pg`) every collective returns at once and moves nothing; an all-to-all
or all-gather would then leave its output unwritten, and attention on unwritten memory can run faster than on real
data (on an H100 with FlashAttention-4 it did, benchmarks/RESULTS.md; presumably its online softmax skips
rescales while a row's maximum holds). `value_preserving_collectives` fills those outputs with this rank's data instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """This process as rank 0 of a fake default group of `world_size` ranks, for the time of the block."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@torch.library.custom_op("wan_bench::exchange_stand_in", mutates_args=("output",))
def _exchange_stand_in(output: torch.Tensor, input_: torch.Tensor) -> None:
    """The local copy standing in for an all-to-all, as an op the compiler cannot see into: like NCCL's, its input
    is a buffer the compiled code must write first, and its copy cannot be merged into the kernel that produces the
    input. (A plain `copy_` was traced into the compiled blocks, where inductor fused it with the layout copy
    before it, so the copy wrote straight into the all-to-all's output and a change that removes the layout copy
    could not show.) Same-dtype and contiguous, the copy runs as a device-to-device memcpy, which
    `wan_bench.profiling.is_device_copy` tells apart."""
    output.copy_(input_)


def _all_to_all_single_stand_in(output, input_, *args, **kwargs):
    """Every chunk comes back from this rank: real values, this rank's own data."""
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
def value_preserving_collectives() -> Iterator[None]:
    """The fake group's all-to-all and all-gather (and Ulysses' grouped exchanges), replaced for the time of a
    measurement by local copies that fill their outputs with this rank's data. The copies are timed with the
    compute. all-reduce stays the fake no-op: the tensor keeps this rank's partial sum, a realistic value."""
    from wan_triton.parallel import ulysses

    saved = dist.all_to_all_single, dist.all_gather, ulysses._start_all_to_all, ulysses._wait
    dist.all_to_all_single, dist.all_gather = _all_to_all_single_stand_in, _all_gather_stand_in
    ulysses._start_all_to_all, ulysses._wait = _start_all_to_all_stand_in, lambda tensor: tensor
    try:
        yield
    finally:
        dist.all_to_all_single, dist.all_gather, ulysses._start_all_to_all, ulysses._wait = saved


class GatherCounter:
    """Stands in for all_gather and gather as `value_preserving_collectives` does, and while `counting` is set
    records the input bytes of each call."""

    def __init__(self) -> None:
        self.bytes: list[int] = []
        self.counting = False

    def _count(self, tensor: torch.Tensor) -> None:
        if self.counting:
            self.bytes.append(tensor.numel() * tensor.element_size())

    def all_gather(self, tensor_list, tensor, *args, **kwargs):
        self._count(tensor)
        _all_gather_stand_in(tensor_list, tensor)

    def gather(self, tensor, gather_list=None, *args, **kwargs):
        self._count(tensor)
        _all_gather_stand_in(gather_list or [], tensor)

    @contextlib.contextmanager
    def installed(self) -> Iterator[GatherCounter]:
        """dist.all_gather and dist.gather replaced by this counter's, for the time of the block."""
        saved = dist.all_gather, dist.gather
        dist.all_gather, dist.gather = self.all_gather, self.gather
        try:
            yield self
        finally:
            dist.all_gather, dist.gather = saved
