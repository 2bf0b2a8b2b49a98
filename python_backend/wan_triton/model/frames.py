"""The VAE decoder's output as uint8 RGB frames, exactly as diffusers' reference pipeline postprocesses it.

`to_uint8_frames` reproduces diffusers' `VideoProcessor.postprocess_video(video, output_type="np")` followed by
`(x * 255).round().astype(np.uint8)` bit for bit, so served frames equal what the reference pipeline produces.
"""

from __future__ import annotations

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """Convert the VAE decoder output [1, 3, F, H, W] (nominally in [-1, 1]) to C-contiguous uint8 RGB [F, H, W, 3],
    copied into `out` (a C-contiguous uint8 array of that shape) where given."""
    if video.ndim != 5:
        raise ValueError(f"video must have shape [1, 3, F, H, W], got rank {video.ndim} shape {tuple(video.shape)}")
    if video.shape[0] != 1:
        raise ValueError(f"video must hold exactly one clip (batch size 1), got shape {tuple(video.shape)}")
    if video.shape[1] != 3:
        raise ValueError(f"video must have 3 (RGB) channels in dim 1, got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a floating-point tensor, got {video.dtype}")
    with torch.no_grad():
        # Same op order and dtype as diffusers' VaeImageProcessor.denormalize (in the tensor's own dtype) followed by
        # pt_to_numpy's float32 cast, so the result is bit-identical to the reference postprocessing for any dtype.
        x = (video[0] * 0.5 + 0.5).clamp(0, 1)
        x = x.permute(1, 2, 3, 0).float()
        # float32 multiply and round-half-to-even match numpy's; converting on the tensor's device moves 4x fewer
        # bytes to the host than float32 would.
        x = (x * 255).round().to(torch.uint8)
        if out is None:
            return np.ascontiguousarray(x.cpu().numpy())
        if out.shape != tuple(x.shape) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous uint8 {tuple(x.shape)}, got {out.dtype} {out.shape}")
        torch.from_numpy(out).copy_(x)
        return out
