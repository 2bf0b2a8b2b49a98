"""Self-attention's operands in e4m3 with one scale per (batch, head), K smoothed: what FlashAttention-3's FP8 forward
takes (`fp8.fp8_attention`).

K is smoothed first: its mean over the tokens (per batch, head and channel) is subtracted, which shifts every score of
a query row by the same amount and leaves the softmax unchanged, while the e4m3 range then covers K's spread instead
of its offset (as SageAttention does). Each scale is the amax of its (batch, head) over the whole sequence / 448.

`reference_quantize_attention` is that math in torch ops (compiled with the block, as served by default);
`quantize_attention` is a `torch.library.custom_op` running it as Triton kernels on CUDA (`fp8_heads_triton`: two
passes over Q, K and V; served after `fp8.use_quantize_kernels`), the reference elsewhere. The GPU test holds the
kernels to the reference.
"""

from __future__ import annotations

import torch

from wan_triton.kernels.fp8_rows import E4M3, E4M3_MAX, MIN_AMAX


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D] -> (e4m3 [B, S, H, D], fp32 scale [B, H]) with x ~= e4m3 * scale: one scale per (batch, head),
    the layout of FlashAttention-3's descale tensors."""
    xf = x.float()
    amax = xf.abs().amax(dim=(1, 3)).clamp(min=MIN_AMAX)  # [B, H]
    scale = amax / E4M3_MAX
    return (xf / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """K minus its mean over the tokens, per (batch, head, channel): each query's scores all move by q . mean,
    which the softmax cancels."""
    wide = k.to(torch.promote_types(k.dtype, torch.float32))
    return (wide - wide.mean(dim=1, keepdim=True)).to(k.dtype)


def reference_quantize_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_k: bool
) -> tuple[torch.Tensor, ...]:
    """(q8, k8, v8 [B, S, H, D] e4m3, q, k, v scales [B, H] fp32) of q, k, v [B, S, H, D], K smoothed first."""
    (q8, qs), (v8, vs) = quantize_heads(q), quantize_heads(v)
    k8, ks = quantize_heads(smooth_keys(k) if smooth_k else k)
    return q8, k8, v8, qs, ks, vs


@torch.library.custom_op("wan_triton::fp8_quantize_attention", mutates_args=())
def _quantize_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_k: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.device.type != "cuda":
        return tuple(t.contiguous() for t in reference_quantize_attention(q, k, v, smooth_k))
    from wan_triton.kernels import fp8_heads_triton

    return fp8_heads_triton.quantize_attention(q, k, v, smooth_k)


@_quantize_attention.register_fake
def _(q, k, v, smooth_k):
    values = [q.new_empty(q.shape, dtype=E4M3) for _ in range(3)]
    scales = [q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32) for _ in range(3)]
    return *values, *scales


def quantize_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_k: bool = True
) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, S, H, D] bf16 -> (q8, k8, v8 [B, S, H, D] e4m3, q, k, v scales [B, H] fp32): each (batch, head)
    scaled by its amax, K smoothed first (`smooth_k`)."""
    return _quantize_attention(q, k, v, smooth_k)
