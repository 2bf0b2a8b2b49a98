"""Per-token e4m3 quantization of a block's activations in one pass over memory, for the FP8 linear layers.

Each FP8 linear layer scales its input per token (`quantize_rows`). Written as torch ops and compiled, the layer
norm, the modulation and the row-wise amax that precede a projection are reductions over the same row, and their
kernel cost 1.5-2.3 ms per layer at 480p next to FP8 GEMMs of 2.5-8.3 ms (benchmarks/RESULTS.md, Precision). The ops
here do it in one pass (Triton kernels on CUDA, `fp8_rows_triton`) and hand the layer a `QuantizedRows`, which
`fp8.Fp8Linear` takes in place of its bf16 input:

    hidden = hidden + delta * gate                      (the residual add before the norm, where there is one)
    y = layer_norm(hidden.float()) [* weight + bias]    (weight, bias: cross-attention's affine norm)
        [* (1 + mod_scale) + mod_shift]                 (the modulation, one row per batch entry)
    rows = quantize_rows(y rounded to bf16)             (as the bf16 block hands the layer its input)

and `gelu_quantize` the same for the FFN's tanh GELU; `quantize` quantizes an input that no fused op before the layer
produces (the attention outputs) as one kernel, faster alone than the compiled ops (served after
`fp8.use_quantize_kernels`). Each is a `torch.library.custom_op`, opaque to torch.compile and captured by CUDA graphs
as one kernel; off CUDA it runs the torch reference below, the math the GPU test checks the kernels against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
# Scales never reach zero (an all-zero row or head keeps a finite reciprocal).
MIN_AMAX = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]) with x ~= e4m3 * scale: one scale per token."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class QuantizedRows(NamedTuple):
    """An activation in e4m3 with one scale per token: values [..., K], scale [..., 1] (fp32)."""

    values: torch.Tensor
    scale: torch.Tensor


def _rows_shaped(values: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rows ([M, K] e4m3, [M, 1] scale) in the shape of the activation they quantize: [..., K], [..., 1]."""
    return values.view(like.shape), scale.view(*like.shape[:-1], 1)


def _empty_rows(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `_rows_shaped` gives for `like`, unfilled (the ops' fake implementations)."""
    return like.new_empty(like.shape, dtype=E4M3), like.new_empty((*like.shape[:-1], 1), dtype=torch.float32)


# The torch references: what the ops compute off CUDA, and what the GPU test holds the kernels to.


def reference_norm(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mod_scale: torch.Tensor | None,
    mod_shift: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    width = hidden.shape[-1]
    # As diffusers' FP32LayerNorm: the norm and its affine parameters in fp32.
    weight, bias = (None if t is None else t.float() for t in (weight, bias))
    y = F.layer_norm(hidden.float(), (width,), weight, bias, eps)
    if mod_scale is not None:
        y = y * (1 + mod_scale.view(hidden.shape[0], 1, width)) + mod_shift.view(hidden.shape[0], 1, width)
    return _rows_shaped(*quantize_rows(y.to(hidden.dtype).reshape(-1, width)), hidden)


def reference_residual_norm(
    hidden: torch.Tensor,
    delta: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mod_scale: torch.Tensor | None,
    mod_shift: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    added = delta.float() if gate is None else delta.float() * gate.view(hidden.shape[0], 1, hidden.shape[-1])
    summed = (hidden.float() + added).to(hidden.dtype)
    return summed, *reference_norm(summed, weight, bias, mod_scale, mod_shift, eps)


def reference_gelu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rows_shaped(*quantize_rows(F.gelu(x.float(), approximate="tanh").to(x.dtype).reshape(-1, x.shape[-1])), x)


@torch.library.custom_op("wan_triton::fp8_norm_quantize", mutates_args=())
def _norm_quantize(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mod_scale: torch.Tensor | None,
    mod_shift: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.device.type != "cuda":
        return reference_norm(hidden, weight, bias, mod_scale, mod_shift, eps)
    from wan_triton.kernels import fp8_rows_triton

    _, values, scale = fp8_rows_triton.norm_quantize_rows(
        hidden, eps, weight=weight, bias=bias, mod_scale=mod_scale, mod_shift=mod_shift
    )
    return _rows_shaped(values, scale, hidden)


@_norm_quantize.register_fake
def _(hidden, weight, bias, mod_scale, mod_shift, eps):
    return _empty_rows(hidden)


@torch.library.custom_op("wan_triton::fp8_residual_norm_quantize", mutates_args=())
def _residual_norm_quantize(
    hidden: torch.Tensor,
    delta: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mod_scale: torch.Tensor | None,
    mod_shift: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if hidden.device.type != "cuda":
        return reference_residual_norm(hidden, delta, gate, weight, bias, mod_scale, mod_shift, eps)
    from wan_triton.kernels import fp8_rows_triton

    summed, values, scale = fp8_rows_triton.norm_quantize_rows(
        hidden, eps, delta=delta, gate=gate, weight=weight, bias=bias, mod_scale=mod_scale, mod_shift=mod_shift
    )
    return summed, *_rows_shaped(values, scale, hidden)


@_residual_norm_quantize.register_fake
def _(hidden, delta, gate, weight, bias, mod_scale, mod_shift, eps):
    return torch.empty_like(hidden), *_empty_rows(hidden)


@torch.library.custom_op("wan_triton::fp8_gelu_quantize", mutates_args=())
def _gelu_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type != "cuda":
        return reference_gelu(x)
    from wan_triton.kernels import fp8_rows_triton

    return _rows_shaped(*fp8_rows_triton.gelu_quantize_rows(x), x)


@_gelu_quantize.register_fake
def _(x):
    return _empty_rows(x)


@torch.library.custom_op("wan_triton::fp8_quantize", mutates_args=())
def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type != "cuda":
        return _rows_shaped(*quantize_rows(x.reshape(-1, x.shape[-1])), x)
    from wan_triton.kernels import fp8_rows_triton

    return _rows_shaped(*fp8_rows_triton.gelu_quantize_rows(x, apply_gelu=False), x)


@_quantize.register_fake
def _(x):
    return _empty_rows(x)


def norm_quantize(
    hidden: torch.Tensor,
    eps: float,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mod_scale: torch.Tensor | None = None,
    mod_shift: torch.Tensor | None = None,
) -> QuantizedRows:
    """hidden [B, S, K] bf16 -> its layer norm (affine with weight, bias [K]; modulated by mod_scale, mod_shift
    [B, 1, K] fp32) in e4m3, per token."""
    return QuantizedRows(*_norm_quantize(hidden, weight, bias, mod_scale, mod_shift, eps))


def residual_norm_quantize(
    hidden: torch.Tensor,
    delta: torch.Tensor,
    eps: float,
    *,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mod_scale: torch.Tensor | None = None,
    mod_shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QuantizedRows]:
    """(hidden + delta * gate rounded to bf16, `norm_quantize` of that sum) for hidden, delta [B, S, K] bf16 and
    gate [B, 1, K] fp32 (none: 1)."""
    summed, values, scale = _residual_norm_quantize(hidden, delta, gate, weight, bias, mod_scale, mod_shift, eps)
    return summed, QuantizedRows(values, scale)


def gelu_quantize(x: torch.Tensor) -> QuantizedRows:
    """x [..., K] bf16 -> GELU(x) (tanh approximation, rounded to bf16) in e4m3, per token."""
    return QuantizedRows(*_gelu_quantize(x))


def quantize(x: torch.Tensor) -> QuantizedRows:
    """x [..., K] bf16 -> x in e4m3, per token: `quantize_rows` as one kernel (an FP8 layer's input that no fused op
    before it quantized, e.g. an attention output)."""
    return QuantizedRows(*_quantize(x))
