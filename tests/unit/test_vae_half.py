"""The float16 VAE decode (deployment `components.vae_decoder.precision: float16`): within a uint8 level of the
float32 decode on average, and a clip whose decode overflows float16 is decoded again in float32, as is every later
one, in `frames` and in `frames_and_mp4` alike.

The tiny model with the most sensitive VAE of the test checkpoints (OTHER_TINY: 6 channels, random weights) on CPU;
tests/gpu/test_gpu_vae_half.py checks the same bound on the GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_triton.components import build_vae_decoder
from wan_triton.config.deployment import ComponentConfig, EngineKind
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.video import encode_mp4

# float16 convolutions on CPU are slow (tens of seconds here): out of `make test-fast`, in `make test`.
pytestmark = pytest.mark.slow

FPS = 16


def _decoder(ckpt: Checkpoint, precision: str):
    cfg = ComponentConfig(engine=EngineKind.TORCH, device="cpu", precision=precision)
    return build_vae_decoder(ckpt, cfg, Path("/nonexistent"))


@pytest.fixture(scope="module")
def ckpt(other_checkpoint) -> Checkpoint:
    return Checkpoint.open(other_checkpoint)


@pytest.fixture(scope="module")
def latents(ckpt) -> torch.Tensor:
    return torch.randn(1, ckpt.latent_channels, 4, 6, 10, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fp32_frames(ckpt, latents) -> np.ndarray:
    return _decoder(ckpt, "float32").frames(latents)


def test_float16_decode_is_within_a_level_of_float32_on_average(ckpt, latents, fp32_frames):
    frames = _decoder(ckpt, "float16").frames(latents)
    diff = np.abs(frames.astype(np.int16) - fp32_frames)
    assert fp32_frames.std() > 10, "the decode gives flat frames: the comparison would prove nothing"
    # Measured here: mean 0.10, max 2 (bfloat16 on the same clip: mean 0.89, max 13).
    assert diff.mean() <= 0.25 and diff.max() <= 4, (int(diff.max()), float(diff.mean()))


@pytest.mark.parametrize("path", ["frames", "frames_and_mp4"])
def test_a_clip_that_overflows_float16_is_decoded_in_float32(ckpt, latents, path, caplog):
    # Latents beyond float16's range (65504) overflow as soon as they are cast; float32 decodes them (to clipped
    # frames).
    huge = latents * 1e5
    expected = _decoder(ckpt, "float32").frames(huge)
    decoder = _decoder(ckpt, "float16")
    with caplog.at_level(logging.WARNING, logger="wan_triton.model.vae"):
        if path == "frames":
            frames = decoder.frames(huge)
        else:
            frames, mp4 = decoder.frames_and_mp4(huge, FPS, "ultrafast", 17)
            assert mp4 == encode_mp4(frames, FPS, "ultrafast", 17)
    np.testing.assert_array_equal(frames, expected)
    assert [r.getMessage() for r in caplog.records] == [
        "the torch.float16 VAE decode gave a video that is not finite: float32 decodes from now on"
    ]
    # Every later clip is decoded in float32 too, with no further warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wan_triton.model.vae"):
        if path == "frames":
            later = decoder.frames(latents)
        else:
            later, _ = decoder.frames_and_mp4(latents, FPS, "ultrafast", 17)
    np.testing.assert_array_equal(later, _decoder(ckpt, "float32").frames(latents))
    assert not caplog.records
