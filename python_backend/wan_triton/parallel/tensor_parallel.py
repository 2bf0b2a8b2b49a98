"""Tensor-parallel layers (Megatron style): column-parallel Linear in, row-parallel Linear out, one all-reduce.

A column-parallel layer keeps rows [j*n/tp, (j+1)*n/tp) of the weight (its output features), so its output is
this rank's slice of the features and needs no communication. A row-parallel layer keeps the matching columns
(input features) and sums the partial products over the group: one all-reduce per layer, bias added once after.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wan_triton.kernels import fp8
from wan_triton.kernels.fp8_rows import QuantizedRows


def _slice(t: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    size = t.shape[dim]
    if size % parts:
        raise ValueError(f"dimension {dim} of size {size} is not divisible by {parts}")
    return t.narrow(dim, index * (size // parts), size // parts).clone()


def shard_column_parallel(linear: nn.Linear, index: int, parts: int) -> None:
    """In place: keep output features [index*n/parts, (index+1)*n/parts) of `linear`."""
    linear.weight = nn.Parameter(_slice(linear.weight.data, 0, index, parts), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(_slice(linear.bias.data, 0, index, parts), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_j @ W_j^T) + b, where x_j and W_j are this rank's slice of the input features."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out_features, in_features / tp]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [out_features], whole
        self.group = group

    @classmethod
    def from_linear(cls, linear: nn.Linear, index: int, parts: int, group: dist.ProcessGroup) -> RowParallelLinear:
        bias = None if linear.bias is None else linear.bias.data.clone()
        return cls(_slice(linear.weight.data, 1, index, parts), bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias

    def to_fp8(self, work_device: torch.device | None = None) -> Fp8RowParallelLinear:
        """This layer at precision fp8 (`fp8.quantize_module` calls it): the weight quantized on `work_device`
        (default: where it is) and kept where it was."""
        home = self.weight.device
        weight8, scale = fp8.quantize_weight(self.weight.detach().to(work_device or home))
        bias = None if self.bias is None else self.bias.detach()
        return Fp8RowParallelLinear(weight8.to(home), scale.to(home), bias, self.group)


class Fp8RowParallelLinear(fp8.Fp8Linear):
    """RowParallelLinear in FP8: this rank's input features in e4m3, the weight scaled per output channel over this
    rank's columns and the activation per token over this rank's features (so the scales, and the rounding, differ
    from one GPU's, which spans all of them), the partial products all-reduced in bf16, the bias added once after."""

    def __init__(
        self, weight8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup
    ) -> None:
        super().__init__(weight8, weight_scale, bias)
        self.group = group

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        y = self.product(x, None)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def rms_norm_eps(norm: nn.RMSNorm) -> float:
    """The epsilon torch.nn.RMSNorm adds: its own, or when None the float32 one (torch computes the statistics of
    float32, bf16 and fp16 inputs in float32: aten._fused_rms_norm's decomposition)."""
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


class DistributedRMSNorm(nn.Module):
    """torch.nn.RMSNorm over a feature dimension split across the tp group (Wan's q/k norm spans all heads).

    The mean of squares needs every rank's features: each rank all-reduces its sum of squares (a [B, S, 1]
    tensor, tiny next to the activations) and divides by the whole width.
    """

    def __init__(self, norm: nn.RMSNorm, index: int, parts: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        (self.full_dim,) = norm.normalized_shape
        self.eps = rms_norm_eps(norm)
        self.weight = nn.Parameter(_slice(norm.weight.data, 0, index, parts), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics for low-precision inputs; the same arithmetic as torch.nn.RMSNorm's reference path.
        xf = x.float()
        sum_sq = xf.pow(2).sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_sq, group=self.group)
        out = xf * torch.rsqrt(sum_sq / self.full_dim + self.eps)
        return (out * self.weight.float()).type_as(x)
