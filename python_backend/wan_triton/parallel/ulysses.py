"""Ulysses sequence parallelism: an all-to-all turns sequence shards into head shards around attention.

Each of the p ranks of a ulysses group holds a contiguous 1/p of the tokens with all of its (tensor-parallel
local) heads. Attention needs every token, so before it the ranks swap: each keeps H/p heads and gathers the
whole sequence; after it they swap back. Two all-to-alls for Q, K, V and one for the output per layer, each
moving (p-1)/p of the tensor.

With G head groups (`attend_head_groups`), each rank's H/p heads are exchanged and attended G at a time, and the
exchanges are started asynchronously: group g+1's Q, K, V travel while group g is attended, and group g's output
travels back while group g+1 is. Only the first group's inputs and the last group's output are then waited for,
1/G of the exchange, as long as a group's attention outlasts a group's exchange.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from wan_triton.kernels.attention import AttentionFn


def _all_to_all(chunks: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """chunks: [p, ...]; chunk i goes to group rank i; returns [p, ...] with chunk i from group rank i."""
    chunks = chunks.contiguous()
    out = torch.empty_like(chunks)  # after .contiguous(): empty_like keeps a permuted view's strides
    dist.all_to_all_single(out, chunks, group=group)
    return out


def _start_all_to_all(chunks: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`_all_to_all` started without waiting for it: the result must go through `_wait` before it is read.

    The functional collective's op itself, not `funcol.all_to_all_single`: under torch.compile that wrapper waits
    at once, leaving the overlap to optional compiler passes. The op and `_wait` are traced as two graph nodes at
    the places they are called, and the work between them runs while NCCL does (on its own stream)."""
    p = chunks.shape[0]
    return torch.ops._c10d_functional.all_to_all_single(chunks.contiguous(), [1] * p, [1] * p, group.group_name)


def _wait(tensor: torch.Tensor) -> torch.Tensor:
    return torch.ops._c10d_functional.wait_tensor(tensor)


def head_chunks(x: torch.Tensor, p: int, groups: int = 1) -> torch.Tensor:
    """x: [B, S/p, H, D] -> the view [G, p(head chunk), B, S/p, H/(p G), D] that the all-to-alls send.

    Head chunk i (heads [i H/p, (i+1) H/p)) goes to rank i, cut into G groups of consecutive heads. Materialising
    it is a copy of the tensor; a producer that computes straight into this order (as `ParallelWanAttnProcessor`
    does for the normalised, rotated Q and K) makes that copy unnecessary."""
    b, s_local, h, d = x.shape
    return x.reshape(b, s_local, p, groups, h // (p * groups), d).permute(3, 2, 0, 1, 4, 5)


def _sequence_major(received: torch.Tensor) -> torch.Tensor:
    """[p(token chunk), B, S/p, h, D] as received -> [B, S, h, D] (all tokens, in order)."""
    p, b, s_local, h, d = received.shape
    return received.permute(1, 0, 2, 3, 4).reshape(b, p * s_local, h, d)


def _token_chunks(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, S, h, D] -> the view [p(token chunk), B, S/p, h, D] that sends token chunk i back to rank i."""
    b, s, h, d = x.shape
    return x.reshape(b, p, s // p, h, d).permute(1, 0, 2, 3, 4)


def exchange_head_chunks(chunks: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """chunks: [p(head chunk), B, S/p, H/p, D] -> [B, S, H/p, D] (all tokens, this rank's heads)."""
    return _sequence_major(_all_to_all(chunks, group))


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x: [B, S, H/p, D] (all tokens, this rank's heads) -> [B, S/p, H, D] (this rank's tokens, all heads)."""
    p = dist.get_world_size(group)
    b, s, h_local, d = x.shape
    out = _all_to_all(_token_chunks(x, p), group)  # [p(head chunk), B, S/p, H/p, D]
    return out.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h_local, d)


def attend_head_groups(
    q: Sequence[torch.Tensor],
    k: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    attend: AttentionFn,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """q, k, v: G groups each, [p(head chunk), B, S/p, H/(p G), D] (the groups of `head_chunks`) -> attention
    output [B, S/p, H, D] (this rank's tokens, all heads). `attend` takes and returns [B, S, heads, D].

    With G = 1 the exchanges are blocking (`exchange_head_chunks`, `heads_to_seq`). With G > 1 they are started
    one group ahead (module docstring); attention is per head, so the result is the same. The groups are separate
    tensors, not views of one: compiled, the producer of Q and K (their norm and rotation) then writes each group's
    exchange input itself. From one tensor made contiguous, inductor copied each later group out in a kernel of
    its own (its cost: benchmarks/RESULTS.md, Parallel)."""
    n = len(q)
    if n == 1:
        out = attend(*(exchange_head_chunks(x[0], group) for x in (q, k, v)))
        return heads_to_seq(out, group)
    p, b, s_local, h_group, d = q[0].shape

    def start(i: int) -> list[torch.Tensor]:
        return [_start_all_to_all(x[i], group) for x in (q, k, v)]

    pending, sent_back = start(0), []
    for i in range(n):
        current, pending = pending, (start(i + 1) if i + 1 < n else [])
        out = attend(*(_sequence_major(_wait(x)) for x in current))  # [B, S, H/(p G), D]
        sent_back.append(_start_all_to_all(_token_chunks(out, p), group))  # [p(head chunk), B, S/p, H/(p G), D]
    # [p(head chunk), G, B, S/p, H/(p G), D] -> [B, S/p, p, G, H/(p G), D]: head i H/p + g H/(p G) + j, in order.
    out = torch.stack([_wait(x) for x in sent_back], dim=1).permute(2, 3, 0, 1, 4, 5)
    return out.reshape(b, s_local, p * n * h_group, d)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of `dim` (x: [..., S, ...] -> [..., S/p, ...])."""
    p, i = dist.get_world_size(group), dist.get_rank(group)
    size = x.shape[dim]
    if size % p:
        raise ValueError(f"sequence length {size} is not divisible by the ulysses degree {p}")
    return x.narrow(dim, i * (size // p), size // p)


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """Inverse of shard_sequence: x: [..., S/p, ...] -> [..., S, ...] on every rank of the group."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
