"""The MP4 encoded while the VAE decodes on the GPU (deployment `video.encode_while_decoding`): the chunked decode
gives the frames of the whole decode bit for bit, and the MP4 is `encode_mp4` of them, in each precision. Skipped
where no CUDA device is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wan_triton.components import build_vae_decoder
from wan_triton.config.deployment import ComponentConfig, EngineKind
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.video import encode_mp4


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_frames_and_mp4_on_the_gpu(other_checkpoint, precision):
    ckpt = Checkpoint.open(other_checkpoint)
    latents = torch.randn(1, ckpt.latent_channels, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    cfg = ComponentConfig(engine=EngineKind.TORCH, device="cuda", precision=precision)
    decoder = build_vae_decoder(ckpt, cfg, Path("/nonexistent"))
    whole = decoder.frames(latents)
    frames, mp4 = decoder.frames_and_mp4(latents, 16, "veryfast", 17)
    # The decoder runs on the very tensors `vae.decode` gives it, a latent frame a call: the same kernels.
    np.testing.assert_array_equal(frames, whole)
    assert mp4 == encode_mp4(frames, 16, "veryfast", 17)
