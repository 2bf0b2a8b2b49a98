"""Ulysses sequence parallelism: an all-to-all turns sequence shards into head shards around attention.

Each of the p ranks of a ulysses group holds a contiguous 1/p of the tokens with all of its (tensor-parallel
local) heads. Attention needs every token, so before it the ranks swap: each keeps H/p heads and gathers the
whole sequence; after it they swap back. Two all-to-alls for Q, K, V and one for the output per layer, each
moving (p-1)/p of the tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(chunks: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """chunks: [p, ...]; chunk i goes to group rank i; returns [p, ...] with chunk i from group rank i."""
    chunks = chunks.contiguous()
    out = torch.empty_like(chunks)  # after .contiguous(): empty_like keeps a permuted view's strides
    dist.all_to_all_single(out, chunks, group=group)
    return out


def head_chunks(x: torch.Tensor, p: int) -> torch.Tensor:
    """x: [B, S/p, H, D] -> the view [p(head chunk), B, S/p, H/p, D] that the all-to-all sends chunk by chunk.

    Materialising it is a copy of the tensor; a producer that computes straight into this order (as
    `ParallelWanAttnProcessor` does for the normalised, rotated Q and K) makes that copy unnecessary."""
    b, s_local, h, d = x.shape
    return x.reshape(b, s_local, p, h // p, d).permute(2, 0, 1, 3, 4)


def exchange_head_chunks(chunks: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """chunks: [p(head chunk), B, S/p, H/p, D] -> [B, S, H/p, D] (all tokens, this rank's heads)."""
    p, b, s_local, h_local, d = chunks.shape
    out = _all_to_all(chunks, group)  # [p(token chunk), B, S/p, H/p, D]
    return out.permute(1, 0, 2, 3, 4).reshape(b, p * s_local, h_local, d)


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x: [B, S/p, H, D] (this rank's tokens, all heads) -> [B, S, H/p, D] (all tokens, this rank's heads)."""
    return exchange_head_chunks(head_chunks(x, dist.get_world_size(group)), group)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x: [B, S, H/p, D] (all tokens, this rank's heads) -> [B, S/p, H, D] (this rank's tokens, all heads)."""
    p = dist.get_world_size(group)
    b, s, h_local, d = x.shape
    chunks = x.reshape(b, p, s // p, h_local, d).permute(1, 0, 2, 3, 4)  # [p(token chunk), B, S/p, H/p, D]
    out = _all_to_all(chunks, group)  # [p(head chunk), B, S/p, H/p, D]
    return out.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h_local, d)


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
