"""Latents to pixels: undo the latent normalization, then run the Wan VAE decoder."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from wan_triton.model.checkpoint import Checkpoint


class VaeDecoder:
    """`decode_fn` maps normalized-back latents [1, z, T, h, w] to video [1, 3, F, H, W] in [-1, 1]."""

    def __init__(
        self,
        ckpt: Checkpoint,
        decode_fn: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        cfg = ckpt.config("vae")
        z_dim = int(cfg["z_dim"])
        self.mean = torch.tensor(cfg["latents_mean"]).view(1, z_dim, 1, 1, 1).to(device, dtype)
        # Kept as the reciprocal and divided by, exactly as WanPipeline does, so results match bit for bit.
        self.inv_std = 1.0 / torch.tensor(cfg["latents_std"]).view(1, z_dim, 1, 1, 1).to(device, dtype)
        self.decode_fn = decode_fn
        self.device = device
        self.dtype = dtype

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, self.dtype)
        with torch.inference_mode():
            return self.decode_fn(latents / self.inv_std + self.mean)

    def frames(self, latents: torch.Tensor) -> np.ndarray | None:
        """uint8 RGB frames [F, H, W, 3] (None on a rank of a split decode other than 0)."""
        # Not at import: it needs PyAV, which GPU benchmark hosts may lack.
        from wan_triton.model.video import to_uint8_frames

        video = self(latents)
        return None if video is None else to_uint8_frames(video)


def torch_vae_decode_fn(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents, return_dict=False)[0]

    return decode
