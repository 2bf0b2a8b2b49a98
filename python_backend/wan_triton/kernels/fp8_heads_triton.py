"""The Triton kernels of `wan_triton.kernels.fp8_heads` (CUDA only: imported when a CUDA tensor meets them).

A scale per (batch, head) needs the amax over the whole sequence, and K's smoothing its mean over the whole sequence,
before any value is quantized: two passes over Q, K and V, with a small reduction between them.

1. `_head_stats_kernel`, one program per block of tokens and (batch, head): partial amax of Q and V and, for K, the
   partial column sums, maxima and minima (or K's amax where K is not smoothed); partials, not atomics, so that every
   run sums in one order (a CUDA graph replays bit for bit what eager ran).
2. `_head_scales_kernel`, one program per (batch, head): K's mean from the column sums; K's smoothed amax as the
   largest of max - mean and mean - min over the channels (the amax of K - mean, without a pass over it); the scales.
3. `_head_quantize_kernel`, like 1: K - mean rounded to bf16 (as the torch reference rounds the smoothed K), each value
   divided by its scale, rounded, saturated and stored as e4m3 in a contiguous [B, S, H, D] tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wan_triton.kernels.fp8_rows_triton import E4M3_MAX, MIN_AMAX

# On CUDA torch divides by a scalar as a product with the scalar's fp32 reciprocal: the reference's scale is
# amax * (1 / 448), which this reproduces exactly.
INV_E4M3_MAX = tl.constexpr(1.0 / E4M3_MAX.value)

# Tokens a program covers: BLOCK_TOKENS at a time, TILES times (fewer partials to reduce than one tile a program).
BLOCK_TOKENS = 64
TILES = 8
NUM_WARPS = 8


@triton.jit
def _tile(ptr, b, h, rows, cols, stride_b, stride_s, stride_h, mask):
    """Rows `rows` of head h of batch entry b, [len(rows), D] in fp32."""
    offsets = b * stride_b + rows[:, None] * stride_s + h * stride_h + cols[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _head_stats_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_sb, q_ss, q_sh,
    k_sb, k_ss, k_sh,
    v_sb, v_ss, v_sh,
    amax_ptr,  # [3, B*H, programs]: partial amax of Q, K (unsmoothed; smoothed: unused), V
    k_sum_ptr,  # [B*H, programs, D]: partial column sums of K (smoothed only), likewise the maxima and minima
    k_max_ptr,
    k_min_ptr,
    seq_len,
    heads,
    SMOOTH_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    batch_heads = tl.num_programs(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    cols = tl.arange(0, HEAD_DIM)
    amax_q = tl.zeros([BLOCK], dtype=tl.float32)
    amax_k = tl.zeros([BLOCK], dtype=tl.float32)
    amax_v = tl.zeros([BLOCK], dtype=tl.float32)
    k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    k_max = tl.full([HEAD_DIM], float("-inf"), dtype=tl.float32)
    k_min = tl.full([HEAD_DIM], float("inf"), dtype=tl.float32)
    for t in tl.range(TILES):
        rows = (block * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        valid = rows < seq_len
        mask = valid[:, None]
        q = _tile(q_ptr, b, h, rows, cols, q_sb, q_ss, q_sh, mask)
        amax_q = tl.maximum(amax_q, tl.max(tl.abs(q), axis=1))
        v = _tile(v_ptr, b, h, rows, cols, v_sb, v_ss, v_sh, mask)
        amax_v = tl.maximum(amax_v, tl.max(tl.abs(v), axis=1))
        k = _tile(k_ptr, b, h, rows, cols, k_sb, k_ss, k_sh, mask)
        if SMOOTH_K:
            k_sum += tl.sum(k, axis=0)
            k_max = tl.maximum(k_max, tl.max(tl.where(mask, k, float("-inf")), axis=0))
            k_min = tl.minimum(k_min, tl.min(tl.where(mask, k, float("inf")), axis=0))
        else:
            amax_k = tl.maximum(amax_k, tl.max(tl.abs(k), axis=1))
    slot = bh * programs + block
    tl.store(amax_ptr + slot, tl.max(amax_q, axis=0))
    tl.store(amax_ptr + batch_heads * programs + slot, tl.max(amax_k, axis=0))
    tl.store(amax_ptr + 2 * batch_heads * programs + slot, tl.max(amax_v, axis=0))
    if SMOOTH_K:
        tl.store(k_sum_ptr + slot * HEAD_DIM + cols, k_sum)
        tl.store(k_max_ptr + slot * HEAD_DIM + cols, k_max)
        tl.store(k_min_ptr + slot * HEAD_DIM + cols, k_min)


@triton.jit
def _head_scales_kernel(
    amax_ptr,
    k_sum_ptr,
    k_max_ptr,
    k_min_ptr,
    q_scale_ptr,  # [B*H] each
    k_scale_ptr,
    v_scale_ptr,
    k_mean_ptr,  # [B*H, D] (smoothed only)
    seq_len,
    programs,
    SMOOTH_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PROGRAMS: tl.constexpr,  # programs rounded up to a power of 2
):
    bh = tl.program_id(0).to(tl.int64)
    batch_heads = tl.num_programs(0).to(tl.int64)
    parts = tl.arange(0, PROGRAMS)
    valid = parts < programs
    amax_q = tl.max(tl.load(amax_ptr + bh * programs + parts, mask=valid, other=0.0), axis=0)
    amax_k = tl.max(tl.load(amax_ptr + (batch_heads + bh) * programs + parts, mask=valid, other=0.0), axis=0)
    amax_v = tl.max(tl.load(amax_ptr + (2 * batch_heads + bh) * programs + parts, mask=valid, other=0.0), axis=0)
    if SMOOTH_K:
        cols = tl.arange(0, HEAD_DIM)
        k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
        k_max = tl.full([HEAD_DIM], float("-inf"), dtype=tl.float32)
        k_min = tl.full([HEAD_DIM], float("inf"), dtype=tl.float32)
        for p in tl.range(programs):
            offsets = (bh * programs + p) * HEAD_DIM + cols
            k_sum += tl.load(k_sum_ptr + offsets)
            k_max = tl.maximum(k_max, tl.load(k_max_ptr + offsets))
            k_min = tl.minimum(k_min, tl.load(k_min_ptr + offsets))
        mean = tl.math.div_rn(k_sum, seq_len.to(tl.float32))
        tl.store(k_mean_ptr + bh * HEAD_DIM + cols, mean)
        # max |bf16(k - mean)| = bf16(max |k - mean|): rounding to nearest is monotonic and odd.
        spread = tl.maximum(k_max - mean, mean - k_min).to(tl.bfloat16).to(tl.float32)
        amax_k = tl.max(spread, axis=0)
    tl.store(q_scale_ptr + bh, tl.maximum(amax_q, MIN_AMAX) * INV_E4M3_MAX)
    tl.store(k_scale_ptr + bh, tl.maximum(amax_k, MIN_AMAX) * INV_E4M3_MAX)
    tl.store(v_scale_ptr + bh, tl.maximum(amax_v, MIN_AMAX) * INV_E4M3_MAX)


@triton.jit
def _store_e4m3(ptr, b, h, rows, cols, seq_len, heads, x, scale, mask, HEAD_DIM: tl.constexpr):
    """x / scale, saturated, as e4m3 into rows `rows` of head h of a contiguous [B, S, H, D] tensor."""
    offsets = ((b * seq_len + rows[:, None]) * heads + h) * HEAD_DIM + cols[None, :]
    tl.store(ptr + offsets, tl.clamp(tl.math.div_rn(x, scale), -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv), mask=mask)


@triton.jit
def _head_quantize_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_sb, q_ss, q_sh,
    k_sb, k_ss, k_sh,
    v_sb, v_ss, v_sh,
    q_scale_ptr,
    k_scale_ptr,
    v_scale_ptr,
    k_mean_ptr,
    q8_ptr,
    k8_ptr,
    v8_ptr,
    seq_len,
    heads,
    SMOOTH_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    cols = tl.arange(0, HEAD_DIM)
    scale_q = tl.load(q_scale_ptr + bh)
    scale_k = tl.load(k_scale_ptr + bh)
    scale_v = tl.load(v_scale_ptr + bh)
    if SMOOTH_K:
        k_mean = tl.load(k_mean_ptr + bh * HEAD_DIM + cols)
    for t in tl.range(TILES):
        rows = (block * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < seq_len)[:, None]
        q = _tile(q_ptr, b, h, rows, cols, q_sb, q_ss, q_sh, mask)
        _store_e4m3(q8_ptr, b, h, rows, cols, seq_len, heads, q, scale_q, mask, HEAD_DIM)
        k = _tile(k_ptr, b, h, rows, cols, k_sb, k_ss, k_sh, mask)
        if SMOOTH_K:
            # As the reference: K - mean in fp32, rounded to bf16 (the smoothed K it quantizes).
            k = (k - k_mean[None, :]).to(tl.bfloat16).to(tl.float32)
        _store_e4m3(k8_ptr, b, h, rows, cols, seq_len, heads, k, scale_k, mask, HEAD_DIM)
        v = _tile(v_ptr, b, h, rows, cols, v_sb, v_ss, v_sh, mask)
        _store_e4m3(v8_ptr, b, h, rows, cols, seq_len, heads, v, scale_v, mask, HEAD_DIM)


def quantize_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_k: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, S, H, D] bf16 (any strides with D contiguous) -> (q8, k8, v8 contiguous [B, S, H, D] e4m3, q, k, v
    scales [B, H] fp32): `fp8_heads.reference_quantize_attention` in three kernels."""
    batch, seq_len, heads, head_dim = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch_heads = batch * heads
    programs = triton.cdiv(seq_len, BLOCK_TOKENS * TILES)
    device, fp32 = q.device, torch.float32
    amax = torch.empty((3, batch_heads, programs), dtype=fp32, device=device)
    k_parts = (batch_heads, programs, head_dim) if smooth_k else (1,)
    k_sum, k_max, k_min = (torch.empty(k_parts, dtype=fp32, device=device) for _ in range(3))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    grid = (programs, batch_heads)
    common = {"SMOOTH_K": smooth_k, "HEAD_DIM": head_dim, "num_warps": NUM_WARPS}
    _head_stats_kernel[grid](
        q, k, v, *strides, amax, k_sum, k_max, k_min, seq_len, heads, BLOCK=BLOCK_TOKENS, TILES=TILES, **common
    )
    # Three tensors, not views of one: a custom op's outputs may not alias each other.
    scales = [torch.empty((batch, heads), dtype=fp32, device=device) for _ in range(3)]
    k_mean = torch.empty((batch_heads, head_dim) if smooth_k else (1,), dtype=fp32, device=device)
    _head_scales_kernel[(batch_heads,)](
        amax, k_sum, k_max, k_min, *scales, k_mean, seq_len, programs,
        PROGRAMS=triton.next_power_of_2(programs), **common,
    )  # fmt: skip
    q8, k8, v8 = (torch.empty((batch, seq_len, heads, head_dim), dtype=torch.float8_e4m3fn, device=device)
                  for _ in range(3))  # fmt: skip
    _head_quantize_kernel[grid](
        q, k, v, *strides, *scales, k_mean, q8, k8, v8, seq_len, heads, BLOCK=BLOCK_TOKENS, TILES=TILES, **common
    )
    return q8, k8, v8, *scales
