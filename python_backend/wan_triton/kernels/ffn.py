"""The feed-forward layer's input projection and its tanh GELU as one GEMM with a bias + GELU epilogue.

diffusers' Wan FFN is Linear(5120 -> 13824), GELU (tanh approximation), Linear(13824 -> 5120). Compiled, the GELU is
its own kernel that reads and writes the whole 13824-wide activation once more (its share of a 720p step:
benchmarks/RESULTS.md, Kernels). `torch._addmm_activation(..., use_gelu=True)` runs the projection through cuBLASLt with
its GELU epilogue (the tanh approximation) applied to the fp32 accumulator before the one rounding to the output
dtype, where diffusers rounds the projection to bf16 before the GELU. Off CUDA the op computes diffusers' two ops.

The op is a `torch.library.custom_op` so that inductor calls it as it is: it would otherwise decompose it into the
GEMM and a separate GELU kernel, which is what this avoids. The module structure and parameter names are unchanged
(the block's FeedForward only changes class), so checkpoints, tensor-parallel shards and expert swapping, which
address parameters by name, are unaffected.
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch import nn

logger = logging.getLogger(__name__)


@torch.library.custom_op("wan_triton::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) for x [..., K], weight [N, K], bias [N]."""
    if x.device.type != "cuda":
        # ATen's CPU `_addmm_activation` applies the exact (erf) GELU, its CUDA one the tanh approximation that Wan
        # uses; off CUDA there is no epilogue to gain, so compute diffusers' two ops.
        return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")
    flat = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class GeluEpilogueFeedForward(FeedForward):
    """diffusers' FeedForward with the input projection and GELU in one op (same submodules, same names)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        proj = self.net[0].proj
        # net[1] and any net[3:] are dropouts with p = 0 (`has_wan_layout` checks), so the output layer follows.
        return self.net[2](linear_gelu_tanh(hidden_states, proj.weight, proj.bias))


def has_wan_layout(ffn: nn.Module) -> bool:
    """The layout this fusion reproduces: GELU(tanh) with a biased projection, a no-op dropout, the output layer."""
    if type(ffn) is not FeedForward or len(ffn.net) < 3:
        return False
    gelu, dropout = ffn.net[0], ffn.net[1]
    return (
        type(gelu) is GELU
        and gelu.approximate == "tanh"
        and gelu.proj.bias is not None
        and isinstance(dropout, nn.Dropout)
        and dropout.p == 0.0
        and all(isinstance(m, nn.Dropout) and m.p == 0.0 for m in list(ffn.net)[3:])
    )


def install(module: nn.Module) -> int:
    """In place: every FeedForward of a WanTransformer3DModel that has diffusers' Wan layout runs its input
    projection and GELU as one op. Returns how many were changed (all of them, for a Wan checkpoint)."""
    changed = 0
    for ffn in module.modules():
        if has_wan_layout(ffn):
            ffn.__class__ = GeluEpilogueFeedForward
            changed += 1
    logger.debug("FFN projection + GELU fused in %d layers", changed)
    return changed
