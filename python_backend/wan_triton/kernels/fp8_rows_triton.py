"""The Triton kernels of `wan_triton.kernels.fp8_rows` (CUDA only: imported when a CUDA tensor meets them).

One program a token's row: it reads the row from device memory once (with the residual added first where a residual
add precedes the norm), normalizes, modulates, rounds to bf16 as the bf16 block does, takes the amax and writes the
e4m3 row and its scale, and, where it added a residual, the new hidden state. The math is fp8_rows' torch reference.

Two layouts of the same math (`Launch`): the whole row in registers (`_norm_quantize_kernel`, `_gelu_quantize_kernel`:
a 5,120-wide row pads to 8,192 lanes, which caps how many rows an SM holds), or the row in chunks read again from
cache for each later pass (the `_chunked` kernels: few registers, many rows in flight). Which is faster at each width
is a measurement (`benchmarks/fp8_kernels.py --parts quant --launches ...`); `launch_for` holds the choice: chunks for
the norms, the whole row for the GELU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

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


@triton.jit
def _normalized(src_ptr, cols, mask, batch, width, mean, rstd, weight_ptr, bias_ptr, mod_scale_ptr, mod_shift_ptr,
                HAS_AFFINE: tl.constexpr, HAS_MODULATION: tl.constexpr):  # fmt: skip
    """One chunk of the row's layer norm (affine, modulated) in fp32, rounded to bf16 as the bf16 block rounds it."""
    y = (tl.load(src_ptr + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    if HAS_AFFINE:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0) + tl.load(bias_ptr + cols, mask=mask, other=0.0)
    if HAS_MODULATION:
        mod_scale = tl.load(mod_scale_ptr + batch * width + cols, mask=mask, other=0.0)
        y = y * (1.0 + mod_scale) + tl.load(mod_shift_ptr + batch * width + cols, mask=mask, other=0.0)
    return y.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _norm_quantize_chunked_kernel(
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
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """`_norm_quantize_kernel` for rows wider than registers hold well: the row in chunks, three passes over it (mean
    and variance, merged chunk by chunk; amax; values), of which only the first reads device memory, the others the
    row again from cache."""
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    src_ptr = (hidden_out_ptr if HAS_DELTA else hidden_ptr) + row * width
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c in tl.range(NUM_CHUNKS, loop_unroll_factor=UNROLL):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        mask = cols < width
        x = tl.load(hidden_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            delta = tl.load(delta_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                delta = delta * tl.load(gate_ptr + batch * width + cols, mask=mask, other=0.0)
            x = (x + delta).to(tl.bfloat16)
            tl.store(hidden_out_ptr + row * width + cols, x, mask=mask)
            x = x.to(tl.float32)
        # Chan et al.'s merge of the chunk's mean and squared deviations into the row's: no E[x^2] - E[x]^2
        # cancellation on a residual stream far from zero mean.
        n = tl.minimum(width - c * CHUNK, CHUNK).to(tl.float32)
        chunk_mean = tl.sum(x, axis=0) / n
        centred = tl.where(mask, x - chunk_mean, 0.0)
        total = count + n
        shift = chunk_mean - mean
        mean = mean + shift * (n / total)
        m2 = m2 + tl.sum(centred * centred, axis=0) + shift * shift * (count * n / total)
        count = total
    # The later passes read the residual sum back: make every thread's stores visible to the others first.
    tl.debug_barrier()
    rstd = 1.0 / tl.sqrt(m2 / width + eps)
    amax = tl.zeros([CHUNK], dtype=tl.float32)
    for c in tl.range(NUM_CHUNKS, loop_unroll_factor=UNROLL):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        mask = cols < width
        y = _normalized(src_ptr, cols, mask, batch, width, mean, rstd, weight_ptr, bias_ptr, mod_scale_ptr,
                        mod_shift_ptr, HAS_AFFINE, HAS_MODULATION)  # fmt: skip
        amax = tl.maximum(amax, tl.where(mask, tl.abs(y), 0.0))
    scale = tl.maximum(tl.max(amax, axis=0), MIN_AMAX) / E4M3_MAX
    for c in tl.range(NUM_CHUNKS, loop_unroll_factor=UNROLL):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        mask = cols < width
        y = _normalized(src_ptr, cols, mask, batch, width, mean, rstd, weight_ptr, bias_ptr, mod_scale_ptr,
                        mod_shift_ptr, HAS_AFFINE, HAS_MODULATION)  # fmt: skip
        q = tl.clamp(tl.math.div_rn(y, scale), -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv)
        tl.store(q_ptr + row * width + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _activation(x_ptr, cols, mask, APPLY_GELU: tl.constexpr):
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if APPLY_GELU:
        # tanh-approximated GELU (diffusers' "gelu-approximate"), tanh(u) = 2 sigmoid(2u) - 1
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * inner)
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _gelu_quantize_chunked_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    width,
    APPLY_GELU: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """`_gelu_quantize_kernel` in chunks: one pass for the amax, a second (from cache) for the values."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([CHUNK], dtype=tl.float32)
    for c in tl.range(NUM_CHUNKS, loop_unroll_factor=UNROLL):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        mask = cols < width
        amax = tl.maximum(amax, tl.where(mask, tl.abs(_activation(x_ptr + row * width, cols, mask, APPLY_GELU)), 0.0))
    scale = tl.maximum(tl.max(amax, axis=0), MIN_AMAX) / E4M3_MAX
    for c in tl.range(NUM_CHUNKS, loop_unroll_factor=UNROLL):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        mask = cols < width
        y = _activation(x_ptr + row * width, cols, mask, APPLY_GELU)
        q = tl.clamp(tl.math.div_rn(y, scale), -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv)
        tl.store(q_ptr + row * width + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


class Launch(NamedTuple):
    """How a kernel covers a row: `chunk` columns at a time (0: the whole row at once, in registers) with `warps`
    warps a program (one program a row), the loop over chunks unrolled `unroll` times (1: a loop at run time, the
    fewest registers; more: more loads in flight per program, more registers)."""

    chunk: int
    warps: int
    unroll: int = 1

    @classmethod
    def parse(cls, text: str) -> Launch:
        """From CHUNKxWARPS or CHUNKxWARPSuUNROLL, e.g. 1024x4 or 1024x4u2 (benchmarks/fp8_kernels.py --launches)."""
        chunk, rest = text.split("x")
        warps, _, unroll = rest.partition("u")
        return cls(int(chunk), int(warps), int(unroll or 1))

    def __str__(self) -> str:
        return f"{self.chunk}x{self.warps}" + (f"u{self.unroll}" if self.unroll != 1 else "")


# Launches by row width that this process serves instead of `launch_for`'s rule (`use_launches`).
_CHOSEN: dict[int, Launch] = {}


def use_launches(launches: Mapping[int, Launch]) -> None:
    """Serve these launches (by row width) of the fused kernels (norms, GELU) in this process instead of
    `launch_for`'s rule: for a benchmark that times a candidate against the served launch in one run
    (benchmarks/denoiser_step.py --fp8-launches)."""
    _CHOSEN.clear()
    _CHOSEN.update(launches)


def launch_for(width: int, quantize_only: bool = False) -> Launch:
    """The served launch of a row of `width` columns, unless `use_launches` chose one: up to 8,192 columns (the
    norms' 5,120) chunks of 1,024 at 4 warps, the fastest of the launches measured; above (the GELU's 13,824) the
    whole row at 32 warps, where no chunked launch was faster. Quantization alone (`quantize_only`: the attention
    outputs, 5,120 wide), with less work a column, was fastest in chunks of 1,024 at 8 warps (benchmarks/RESULTS.md,
    Precision: one-pass activation quantization)."""
    if quantize_only:
        return Launch(1024, 8)
    return _CHOSEN.get(width) or (Launch(0, 32) if width > 8192 else Launch(1024, 4))


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
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B, S, K] bf16 (+ delta [B, S, K] * gate [B, K]) -> (hidden after the residual add [B, S, K],
    e4m3 [B*S, K], fp32 scale [B*S, 1]) of the layer norm (affine with weight/bias [K]) modulated by
    mod_scale/mod_shift [B, K]. Without delta the first output is `hidden` itself. `launch`: `launch_for(K)` unless
    given (benchmarks)."""
    batch, rows_per_batch, width = hidden.shape
    launch = launch or launch_for(width)
    hidden = hidden.contiguous()
    q = torch.empty((batch * rows_per_batch, width), dtype=torch.float8_e4m3fn, device=hidden.device)
    scale = torch.empty((batch * rows_per_batch, 1), dtype=torch.float32, device=hidden.device)
    hidden_out = torch.empty_like(hidden) if delta is not None else hidden
    fp32 = {"dtype": torch.float32}

    def per_batch(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(batch, width).to(**fp32).contiguous()

    args = (
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
    )
    flags = {
        "HAS_DELTA": delta is not None,
        "HAS_GATE": gate is not None,
        "HAS_AFFINE": weight is not None,
        "HAS_MODULATION": mod_scale is not None,
    }
    grid = (batch * rows_per_batch,)
    if launch.chunk:
        _norm_quantize_chunked_kernel[grid](
            *args,
            **flags,
            CHUNK=launch.chunk,
            NUM_CHUNKS=triton.cdiv(width, launch.chunk),
            UNROLL=launch.unroll,
            num_warps=launch.warps,
        )
    else:
        _norm_quantize_kernel[grid](*args, **flags, BLOCK=triton.next_power_of_2(width), num_warps=launch.warps)
    return hidden_out, q, scale


def gelu_quantize_rows(
    x: torch.Tensor, apply_gelu: bool = True, launch: Launch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] bf16 -> (e4m3 [M, K], fp32 scale [M, 1]) of GELU(x) (tanh approximation), or of x itself.
    `launch`: `launch_for` unless given (benchmarks)."""
    width = x.shape[-1]
    launch = launch or launch_for(width, quantize_only=not apply_gelu)
    rows = x.numel() // width
    x = x.contiguous()
    q = torch.empty((rows, width), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if launch.chunk:
        _gelu_quantize_chunked_kernel[(rows,)](
            x, q, scale, width, APPLY_GELU=apply_gelu, CHUNK=launch.chunk,
            NUM_CHUNKS=triton.cdiv(width, launch.chunk), UNROLL=launch.unroll, num_warps=launch.warps,
        )  # fmt: skip
    else:
        _gelu_quantize_kernel[(rows,)](
            x, q, scale, width, APPLY_GELU=apply_gelu, BLOCK=triton.next_power_of_2(width), num_warps=launch.warps
        )
    return q, scale
