"""Shard a diffusers WanTransformer3DModel in place for one rank of a plan, and its attention processor.

- Tensor parallel (tp group): in every block, to_q / to_k / to_v (self and cross attention) and the FFN's input
  projection are column-parallel (this rank's heads / FFN columns); to_out and the FFN's output projection are
  row-parallel with one all-reduce each; norm_q / norm_k, an RMSNorm over all heads in Wan, become a
  DistributedRMSNorm. Everything else (patch embedding, time / text embedders, modulation, output head) is small
  and runs replicated.
- Ulysses (ulysses group): forward hooks cut the token sequence after the patch embedding (and the rotary
  tables with it) into this rank's contiguous slice, and gather the output head's tokens back, so diffusers'
  forward is reused unchanged; self-attention swaps sequence for heads around the kernel. Cross-attention needs
  no exchange: each rank's queries attend to the whole (replicated) text.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import attention, ffn
from ..attention import AttentionFn, WanT2VAttnProcessor
from .groups import PlanGroups
from .tensor_parallel import DistributedRMSNorm, RowParallelLinear, shard_column_parallel
from .ulysses import gather_sequence, heads_to_seq, seq_to_heads, shard_sequence

logger = logging.getLogger(__name__)


class ParallelWanAttnProcessor(WanT2VAttnProcessor):
    """WanT2VAttnProcessor whose self-attention runs Ulysses: [B, S/p, H, D] -> all-to-all -> [B, S, H/p, D]."""

    def __init__(self, attend: AttentionFn, ulysses_group) -> None:
        super().__init__(attend)
        self.ulysses_group = ulysses_group

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_attention: bool) -> torch.Tensor:
        if not self_attention or self.ulysses_group is None:
            return self.attend(q, k, v)
        g = self.ulysses_group
        out = self.attend(seq_to_heads(q, g), seq_to_heads(k, g), seq_to_heads(v, g))
        return heads_to_seq(out, g)


def shard_tensor_parallel(module: nn.Module, index: int, parts: int, group) -> None:
    """In place: keep tp rank `index` of `parts` of every block's attention and FFN. The tensors kept are the
    ones `shards.TP_RULES` names (the build-time shard files hold exactly this module's state dict)."""
    for block in module.blocks:
        for attn in (block.attn1, block.attn2):
            for linear in (attn.to_q, attn.to_k, attn.to_v):
                shard_column_parallel(linear, index, parts)
            attn.norm_q = DistributedRMSNorm(attn.norm_q, index, parts, group)
            attn.norm_k = DistributedRMSNorm(attn.norm_k, index, parts, group)
            attn.to_out[0] = RowParallelLinear.from_linear(attn.to_out[0], index, parts, group)
            attn.heads //= parts
            attn.inner_dim //= parts
            attn.kv_inner_dim //= parts
        shard_column_parallel(block.ffn.net[0].proj, index, parts)
        block.ffn.net[2] = RowParallelLinear.from_linear(block.ffn.net[2], index, parts, group)


def _install_sequence_hooks(module: nn.Module, group) -> None:
    def rope_out(_module, _args, rotary):  # (cos, sin), each [1, S, 1, D] -> [1, S/p, 1, D]
        return tuple(shard_sequence(t, group, dim=1) for t in rotary)

    def first_block_in(_module, args):  # hidden_states [B, S, dim] -> [B, S/p, dim]
        return (shard_sequence(args[0], group, dim=1), *args[1:])

    def head_out(_module, _args, out):  # [B, S/p, C x patch] -> [B, S, C x patch]
        return gather_sequence(out, group, dim=1)

    module.rope.register_forward_hook(rope_out)
    module.blocks[0].register_forward_pre_hook(first_block_in)
    module.proj_out.register_forward_hook(head_out)


def parallelize(
    module: nn.Module, groups: PlanGroups, backend: attention.AttentionBackend | str, device: torch.device
) -> attention.AttentionBackend:
    """Turn a whole WanTransformer3DModel into this rank's part of the plan (in place). With tp > 1 the module
    may already hold only this rank's shard (loaded by `shards.load_rank_shard`); then only the processor and
    the hooks are installed."""
    plan = groups.plan
    plan.check_transformer(dict(module.config))
    if plan.tp > 1 and not getattr(module, "_wan_tp_sharded", False):
        shard_tensor_parallel(module, groups.coords.tp, plan.tp, groups.tp)
        module._wan_tp_sharded = True
    chosen = attention.resolve(backend, device, module.config.attention_head_dim)
    module.set_attn_processor(ParallelWanAttnProcessor(attention.attention_fn(chosen), groups.ulysses))
    if chosen != attention.AttentionBackend.REFERENCE:
        attention.fuse_projections(module)  # after sharding: the fused weight holds this rank's Q, K, V
        ffn.install(module)  # the GELU in the (column-parallel) FFN input projection's epilogue
    if groups.ulysses is not None:
        _install_sequence_hooks(module, groups.ulysses)
    logger.info("rank %d: expert parallelized as %s (attention %s)", groups.rank, plan, chosen.value)
    return chosen
