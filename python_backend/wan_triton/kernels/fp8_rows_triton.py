"""The Triton kernels of `wan_triton.kernels.fp8_rows` (CUDA only: imported when a CUDA tensor meets them).

One program holds one token's row in registers: it reads the row once (with the residual added first where a residual
add precedes the norm), normalizes, modulates, rounds to bf16 as the bf16 block does, takes the amax and writes the
e4m3 row and its scale, and, where it added a residual, the new hidden state. The math is fp8_rows' torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# As in wan_triton.kernels.fp8, as constants a Triton kernel may read.
E4M3_MAX = tl.constexpr(448.0)
MIN_AMAX = tl.constexpr(1e-12)


@triton.jit
def _store_quantized(y, q_ptrs, scale_ptr, mask):
    """Round y (fp32) to bf16, as the bf16 graph hands a linear layer its input, and store it as e4m3 with one scale
    for the row; the division rounds exactly, as torch's does."""
    y = y.to(tl.bfloat16).to(tl.float32)
    amax = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0), MIN_AMAX)
    scale = amax / E4M3_MAX
    tl.store(q_ptrs, tl.clamp(tl.math.div_rn(y, scale), -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _norm_quantize_kernel(
    hidden_ptr,
    delta_ptr,
    gate_ptr,
    hidden_out_ptr,
    weight_ptr,
    bias_ptr,
    mod_scale_ptr,
    mod_shift_ptr,
    q_ptr,
    scale_ptr,
    rows_per_batch,
    width,
    eps,
    HAS_DELTA: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    HAS_MODULATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    offsets = row * width + cols
    x = tl.load(hidden_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            delta = delta * tl.load(gate_ptr + batch * width + cols, mask=mask, other=0.0)
        # The residual stream is bf16 between the block's parts: round as the block does, then normalize that.
        x = (x + delta).to(tl.bfloat16)
        tl.store(hidden_out_ptr + offsets, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / width
    centred = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centred * centred, axis=0) / width
    y = centred / tl.sqrt(variance + eps)
    if HAS_AFFINE:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0) + tl.load(bias_ptr + cols, mask=mask, other=0.0)
    if HAS_MODULATION:
        mod_scale = tl.load(mod_scale_ptr + batch * width + cols, mask=mask, other=0.0)
        y = y * (1.0 + mod_scale) + tl.load(mod_shift_ptr + batch * width + cols, mask=mask, other=0.0)
    _store_quantized(y, q_ptr + offsets, scale_ptr + row, mask)


@triton.jit
def _gelu_quantize_kernel(x_ptr, q_ptr, scale_ptr, width, APPLY_GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    offsets = row * width + cols
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if APPLY_GELU:
        # tanh-approximated GELU (diffusers' "gelu-approximate"), tanh(u) = 2 sigmoid(2u) - 1
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * inner)
    _store_quantized(x, q_ptr + offsets, scale_ptr + row, mask)


def _warps(width: int) -> int:
    """Warps a program (one row): 8 up to 8,192 columns, 16 above; `num_warps` overrides it (benchmarks/
    fp8_kernels.py --warps)."""
    return 16 if width > 8192 else 8


def norm_quantize_rows(
    hidden: torch.Tensor,
    eps: float,
    *,
    delta: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mod_scale: torch.Tensor | None = None,
    mod_shift: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B, S, K] bf16 (+ delta [B, S, K] * gate [B, K]) -> (hidden after the residual add [B, S, K],
    e4m3 [B*S, K], fp32 scale [B*S, 1]) of the layer norm (affine with weight/bias [K]) modulated by
    mod_scale/mod_shift [B, K]. Without delta the first output is `hidden` itself."""
    batch, rows_per_batch, width = hidden.shape
    hidden = hidden.contiguous()
    q = torch.empty((batch * rows_per_batch, width), dtype=torch.float8_e4m3fn, device=hidden.device)
    scale = torch.empty((batch * rows_per_batch, 1), dtype=torch.float32, device=hidden.device)
    hidden_out = torch.empty_like(hidden) if delta is not None else hidden
    fp32 = {"dtype": torch.float32}

    def per_batch(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(batch, width).to(**fp32).contiguous()

    _norm_quantize_kernel[(batch * rows_per_batch,)](
        hidden,
        None if delta is None else delta.contiguous(),
        per_batch(gate),
        hidden_out,
        None if weight is None else weight.to(**fp32).contiguous(),
        None if bias is None else bias.to(**fp32).contiguous(),
        per_batch(mod_scale),
        per_batch(mod_shift),
        q,
        scale,
        rows_per_batch,
        width,
        eps,
        HAS_DELTA=delta is not None,
        HAS_GATE=gate is not None,
        HAS_AFFINE=weight is not None,
        HAS_MODULATION=mod_scale is not None,
        BLOCK=triton.next_power_of_2(width),
        num_warps=num_warps or _warps(width),
    )
    return hidden_out, q, scale


def gelu_quantize_rows(
    x: torch.Tensor, apply_gelu: bool = True, num_warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] bf16 -> (e4m3 [M, K], fp32 scale [M, 1]) of GELU(x) (tanh approximation), or of x itself."""
    width = x.shape[-1]
    rows = x.numel() // width
    x = x.contiguous()
    q = torch.empty((rows, width), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    _gelu_quantize_kernel[(rows,)](
        x,
        q,
        scale,
        width,
        APPLY_GELU=apply_gelu,
        BLOCK=triton.next_power_of_2(width),
        num_warps=num_warps or _warps(width),
    )
    return q, scale
