"""VAE decode split over the ranks of a group: each rank decodes a contiguous 1/p of the frame's width.

The split reproduces one GPU's decode (up to floating-point summation order) because of what Wan's decoder reads:
- per pixel: the RMS norms (over channels), the 1x1 convolutions, nearest-exact 2x upsampling, the causal time
  convolutions (kernel 3x1x1) and the time cache of every causal convolution (the last frames of its input): a
  rank's strip of them is the strip of the whole;
- one column beyond the strip on each side: the 3x3(x3) convolutions. Before each, a rank takes a halo of that
  many columns from its neighbours (zeros at the frame's edges, as the convolution's own zero padding does). The
  halo is taken after the time cache is prepended, so it carries the neighbours' cached frames as well;
- the whole frame: the mid-block's attention (one head over every pixel of a frame). Each rank keeps its queries
  and gathers every rank's keys and values.
The strips' frames are gathered on rank 0 at the end. A latent width that does not divide by the group size is
decoded whole by rank 0 alone (the same modules with the split switched off: zero padding, no gathers).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wan_triton.parallel.ulysses import gather_sequence

logger = logging.getLogger(__name__)


@dataclass
class SplitState:
    """The group a split decoder exchanges over, and whether the current decode is split (else: whole, alone)."""

    group: dist.ProcessGroup
    active: bool = True


def width_halo(x: torch.Tensor, pad: int, split: SplitState) -> torch.Tensor:
    """[..., W/p] -> [..., pad + W/p + pad]: the neighbours' edge columns on each side, zeros at the frame edges."""
    if not split.active:
        return F.pad(x, (pad, pad))
    group = split.group
    p, i = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[-1] < pad:
        raise ValueError(f"a strip of {x.shape[-1]} columns cannot give a halo of {pad}")
    edges = torch.cat([x[..., :pad], x[..., -pad:]], dim=-1).contiguous()
    # One all-gather of every rank's two edges (a few KB to MB) instead of paired sends: a collective is what
    # both gloo and NCCL (also inside a CUDA graph) run the same way.
    parts = [torch.empty_like(edges) for _ in range(p)]
    dist.all_gather(parts, edges, group=group)
    zeros = torch.zeros_like(x[..., :pad])
    left = parts[i - 1][..., pad:] if i > 0 else zeros
    right = parts[i + 1][..., :pad] if i < p - 1 else zeros
    return torch.cat([left, x, right], dim=-1)


def _gather_width_on_rank0(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor | None:
    x = x.contiguous()
    if dist.get_rank(group) != 0:
        dist.gather(x, None, dst=dist.get_global_rank(group, 0), group=group)
        return None
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.gather(x, parts, dst=dist.get_global_rank(group, 0), group=group)
    return torch.cat(parts, dim=-1)


def _causal_conv3d_forward(split: SplitState):
    """diffusers' WanCausalConv3d.forward with the width padding taken from the neighbours."""

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        padding = list(self._padding)  # (w, w, h, h, 2t, 0)
        if cache_x is not None and self._padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        pad_w, padding[0], padding[1] = padding[0], 0, 0
        x = F.pad(x, padding)
        if pad_w:
            x = width_halo(x, pad_w, split)
        return nn.Conv3d.forward(self, x)

    return forward


class HaloConv2d(nn.Module):
    """An nn.Conv2d with zero padding (the upsampler's 3x3), its width padding taken from the neighbours."""

    def __init__(self, conv: nn.Conv2d, split: SplitState) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
            raise ValueError(f"cannot split {conv}")
        self.conv = conv
        self.pad_h, self.pad_w = conv.padding
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, self.pad_h, self.pad_h))
        if self.pad_w:
            x = width_halo(x, self.pad_w, self.split)
        conv = self.conv
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _attention_forward(split: SplitState):
    """diffusers' WanAttentionBlock.forward with every rank's keys and values (the attention spans the frame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        batch_size, channels, time, height, width = x.size()
        x = x.permute(0, 2, 1, 3, 4).reshape(batch_size * time, channels, height, width)
        x = self.norm(x)
        qkv = self.to_qkv(x).reshape(batch_size * time, 1, channels * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        if split.active:
            # Keys and values in rank order, not the frame's raster order: attention does not depend on key order.
            k, v = gather_sequence(k, split.group, dim=2), gather_sequence(v, split.group, dim=2)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(batch_size * time, channels, height, width)
        x = self.proj(x)
        x = x.view(batch_size, time, channels, height, width).permute(0, 2, 1, 3, 4)
        return x + identity

    return forward


def split_vae_decoder(vae: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """In place: make an AutoencoderKLWan's decoder run on this rank's width strip of the group."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d, WanResample

    if getattr(vae.config, "patch_size", None) is not None:
        raise ValueError("the width split supports the Wan 2.1 VAE (no patchified output)")
    split = SplitState(group)
    counts = {"conv3d": 0, "conv2d": 0, "attention": 0}
    for module in vae.decoder.modules():
        if isinstance(module, WanCausalConv3d):
            module.forward = types.MethodType(_causal_conv3d_forward(split), module)
            counts["conv3d"] += 1
        elif isinstance(module, WanAttentionBlock):
            module.forward = types.MethodType(_attention_forward(split), module)
            counts["attention"] += 1
        elif isinstance(module, WanResample) and isinstance(module.resample, nn.Sequential):
            for index, layer in enumerate(module.resample):
                if isinstance(layer, nn.Conv2d):
                    module.resample[index] = HaloConv2d(layer, split)
                    counts["conv2d"] += 1
    vae._wan_split = split
    logger.debug("VAE decoder split over %d ranks: %s", dist.get_world_size(group), counts)
    return vae


def split_decode_fn(vae: nn.Module, group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """A VaeDecoder `decode_fn` for every rank of `group`: latents [1, z, T, h, w] (the whole, on every rank) ->
    video [1, 3, F, H, W] on rank 0, None on the others. Each rank decodes w/p latent columns; a width that does
    not divide is decoded whole by rank 0. `vae` must have been through `split_vae_decoder`."""
    split: SplitState = vae._wan_split
    p, i = dist.get_world_size(group), dist.get_rank(group)

    def decode(latents: torch.Tensor) -> torch.Tensor | None:
        width = latents.shape[-1]
        if width % p:
            if i != 0:
                return None
            split.active = False
            try:
                return vae.decode(latents, return_dict=False)[0]
            finally:
                split.active = True
        strip = latents[..., i * (width // p) : (i + 1) * (width // p)]
        return _gather_width_on_rank0(vae.decode(strip, return_dict=False)[0], group)

    return decode
