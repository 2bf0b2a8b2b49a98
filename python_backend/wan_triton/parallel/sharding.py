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
import torch.distributed as dist
from torch import nn

from wan_triton.kernels import attention, ffn, fp8
from wan_triton.kernels.attention import AttentionFn, WanT2VAttnProcessor
from wan_triton.parallel.process_groups import PlanGroups
from wan_triton.parallel.tensor_parallel import (
    DistributedRMSNorm,
    RowParallelLinear,
    rms_norm_eps,
    shard_column_parallel,
)
from wan_triton.parallel.ulysses import attend_head_groups, gather_sequence, head_chunks, shard_sequence

logger = logging.getLogger(__name__)


class ParallelWanAttnProcessor(WanT2VAttnProcessor):
    """WanT2VAttnProcessor whose self-attention runs Ulysses: [B, S/p, H, D] -> all-to-all -> [B, S, H/p, D].

    With `chunked_qk` (the default), Q and K are normalised and rotated straight into the order the all-to-all
    sends (`ulysses.head_chunks`): the compiled norm-and-rotate kernel then writes the all-to-all's input itself.
    Normalising first and laying out after (`chunked_qk=False`) left a second kernel that casts and copies the
    rotated Q and K into that order (its cost: benchmarks/RESULTS.md, Parallel).

    With `head_groups` G > 1, a rank's heads are exchanged and attended G at a time, each group's all-to-all
    overlapping the previous group's attention (`ulysses.attend_head_groups`).

    `self_attend`: self-attention's kernel where it is not `attend` (precision fp8: `fp8.fp8_attention`, on the
    rank's heads over the whole sequence); cross-attention always takes `attend`."""

    def __init__(
        self,
        attend: AttentionFn,
        ulysses_group,
        chunked_qk: bool = True,
        head_groups: int = 1,
        self_attend: AttentionFn | None = None,
    ) -> None:
        super().__init__(attend)
        self.ulysses_group = ulysses_group
        self.chunked_qk = chunked_qk
        self.head_groups = head_groups
        self.self_attend = self_attend or attend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if (
            encoder_hidden_states is not None
            or self.ulysses_group is None
            or not self.chunked_qk
            or rotary_emb is None
            or not (_is_plain_rms_norm(attn.norm_q) and _is_plain_rms_norm(attn.norm_k))  # not tensor-parallel
        ):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        g, n = self.ulysses_group, self.head_groups
        p = dist.get_world_size(g)
        query, key, value = self._project(attn, hidden_states, None, attention_mask)
        q = _normalised_rotated_chunks(query, attn.norm_q, attn.heads, p, rotary_emb, n)
        k = _normalised_rotated_chunks(key, attn.norm_k, attn.heads, p, rotary_emb, n)
        v = head_chunks(value.unflatten(2, (attn.heads, -1)), p, n).unbind(0)
        out = attend_head_groups(q, k, v, self.self_attend, g).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_attention: bool) -> torch.Tensor:
        if not self_attention:
            return self.attend(q, k, v)
        if self.ulysses_group is None:
            return self.self_attend(q, k, v)
        g, n = self.ulysses_group, self.head_groups
        p = dist.get_world_size(g)
        return attend_head_groups(*(head_chunks(x, p, n).unbind(0) for x in (q, k, v)), self.self_attend, g)


def _is_plain_rms_norm(norm: nn.Module) -> bool:
    return type(norm) is nn.RMSNorm and norm.weight is not None and len(norm.normalized_shape) == 1


def _normalised_rotated_chunks(
    x: torch.Tensor, norm: nn.RMSNorm, heads: int, p: int, rotary: tuple[torch.Tensor, torch.Tensor], groups: int = 1
) -> list[torch.Tensor]:
    """x: [B, S/p, H x D] -> norm(x) with the rotary embedding, as G groups [p(head chunk), B, S/p, H/(p G), D]
    (each rotated on its own, so that each is an output of the compiled norm kernel).

    The RMS norm is written out with torch's own arithmetic for it (aten._fused_rms_norm's decomposition: fp32
    statistics, weight applied in fp32, one cast), so that the rotation and the chunk order follow it in the same
    compiled kernel."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + rms_norm_eps(norm)) * norm.weight).type_as(x)
    chunks = head_chunks(normed.unflatten(2, (heads, -1)), p, groups)
    cos, sin = (t.unsqueeze(0) for t in rotary)  # [1, S/p, 1, D] -> [1, 1, S/p, 1, D], against a group's axes
    return [attention._rotate(chunk, cos, sin) for chunk in chunks.unbind(0)]


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

    def per_token_time_out(_module, _args, out):
        # Per-token timesteps (TI2V-5B): temb [B, S, dim] and timestep_proj [B, S, 6 x dim] follow the tokens, so
        # each rank keeps its tokens' rows for its blocks and the output norm.
        temb, timestep_proj, *rest = out
        if temb.ndim != 3:
            return out
        return (shard_sequence(temb, group, dim=1), shard_sequence(timestep_proj, group, dim=1), *rest)

    module.rope.register_forward_hook(rope_out)
    module.blocks[0].register_forward_pre_hook(first_block_in)
    module.proj_out.register_forward_hook(head_out)
    module.condition_embedder.register_forward_hook(per_token_time_out)


def parallelize(
    module: nn.Module,
    groups: PlanGroups,
    backend: attention.AttentionBackend | str,
    device: torch.device,
    ulysses_head_groups: int = 1,
) -> attention.AttentionBackend:
    """Turn a whole WanTransformer3DModel into this rank's part of the plan (in place). With tp > 1 the module
    may already hold only this rank's shard (loaded by `shards.load_rank_shard`); then only the processor and
    the hooks are installed. `ulysses_head_groups`: see `ParallelWanAttnProcessor`."""
    plan = groups.plan
    plan.check_transformer(dict(module.config), ulysses_head_groups)
    if plan.tp > 1 and not getattr(module, "_wan_tp_sharded", False):
        shard_tensor_parallel(module, groups.coords.tp, plan.tp, groups.tp)
        module._wan_tp_sharded = True
    chosen = attention.resolve(backend, device, module.config.attention_head_dim, module.dtype)
    processor = ParallelWanAttnProcessor(
        attention.attention_fn(chosen), groups.ulysses, head_groups=ulysses_head_groups
    )
    module.set_attn_processor(processor)
    if chosen != attention.AttentionBackend.REFERENCE:
        attention.fuse_projections(module)  # after sharding: the fused weight holds this rank's Q, K, V
        ffn.install(module)  # the GELU in the (column-parallel) FFN input projection's epilogue
    if groups.ulysses is not None:
        _install_sequence_hooks(module, groups.ulysses)
    logger.info("rank %d: expert parallelized as %s (attention %s)", groups.rank, plan, chosen.value)
    return chosen


def install_fp8(
    module: nn.Module,
    groups: PlanGroups,
    backend: attention.AttentionBackend | str,
    device: torch.device,
    stored: fp8.StoredWeights | None = None,
) -> None:
    """precision fp8 on this rank's part of the plan, after `parallelize` (in place): self-attention in FP8 on the
    rank's heads (after the Ulysses exchange, so each head's scales and key smoothing see the whole sequence, as on
    one GPU), every block linear layer in FP8 (the row-parallel ones scaled over this rank's columns:
    `Fp8RowParallelLinear`), their inputs quantized in one pass (`fp8.install_blocks`). `stored`: build-time FP8
    weights, which are of whole layers: for plans without tp. Raises ValueError where FP8 cannot run."""
    fp8.require(device, backend)
    processor = module.blocks[0].attn1.processor
    module.set_attn_processor(
        ParallelWanAttnProcessor(
            processor.attend, groups.ulysses, head_groups=processor.head_groups, self_attend=fp8.fp8_attention
        )
    )
    fp8.quantize_module(module, stored=stored)
    fp8.install_blocks(module)
    logger.info("rank %d: expert in fp8", groups.rank)
