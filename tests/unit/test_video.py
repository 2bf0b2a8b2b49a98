"""Tests for wan_triton.model.frames and .video: reference-exact uint8 conversion and the MP4 encode/decode round
trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_triton.model.frames import to_uint8_frames
from wan_triton.model.video import decode_mp4, encode_mp4


def _reference_uint8(video: torch.Tensor) -> np.ndarray:
    from diffusers.video_processor import VideoProcessor

    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="np")
    return (frames[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_uint8_frames_matches_diffusers(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    # Scaled past [-1, 1] so clamping is exercised at both ends.
    video = (torch.randn(1, 3, 5, 24, 40, generator=generator) * 1.5).to(dtype)
    # Exact half-levels are where rounding mode matters.
    video[0, 0, 0, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255 - 1, 2 / 255 - 1 + 1 / 255], dtype=dtype)

    frames = to_uint8_frames(video)

    assert frames.dtype == np.uint8
    assert frames.shape == (5, 24, 40, 3)
    assert frames.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(frames, _reference_uint8(video))
    assert frames.min() == 0 and frames.max() == 255
    # Into a slice of a larger clip, as the chunked decode fills one: the same values, in place.
    clip = np.zeros((7, 24, 40, 3), np.uint8)
    assert to_uint8_frames(video, out=clip[1:6]) is not None
    np.testing.assert_array_equal(clip[1:6], frames)
    assert not clip[0].any() and not clip[6].any()
    with pytest.raises(ValueError, match="out must be C-contiguous uint8"):
        to_uint8_frames(video, out=clip[1:5])


@pytest.mark.parametrize(
    "shape",
    [(3, 2, 8, 8), (1, 4, 2, 8, 8), (1, 1, 2, 8, 8), (2, 3, 2, 8, 8), (1, 3, 2, 8, 8, 1)],
)
def test_to_uint8_frames_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        to_uint8_frames(torch.zeros(shape))


def _gradient_video(num_frames: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in range(num_frames):
        red = (x * 255 / width + 3 * t) % 256
        green = y * 255 / height
        blue = (x + y + 5 * t) * 255 / (height + width + 5 * num_frames)
        frames.append(np.stack([red, green, blue], axis=-1))
    return np.stack(frames).round().astype(np.uint8)


def test_encode_decode_round_trip() -> None:
    frames = _gradient_video(num_frames=17, height=96, width=160)

    data = encode_mp4(frames, fps=16)
    decoded = decode_mp4(data)

    assert data[4:8] == b"ftyp"
    assert decoded.shape == frames.shape
    assert decoded.dtype == np.uint8
    assert np.abs(decoded.astype(np.int16) - frames.astype(np.int16)).mean() < 3


def test_encode_puts_index_before_media() -> None:
    data = encode_mp4(_gradient_video(num_frames=3, height=32, width=48), fps=16)

    top_level = []
    offset = 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        top_level.append(data[offset + 4 : offset + 8])
        assert size >= 8
        offset += size
    assert top_level.index(b"moov") < top_level.index(b"mdat")


def test_encode_is_deterministic() -> None:
    # A width that is not a multiple of 64 and several encodes with the heap in different states: that is what exposed
    # x264's AVX-512 paths reading uninitialised memory.
    frames = _gradient_video(num_frames=9, height=64, width=96)
    first = encode_mp4(frames, fps=16)
    keep_alive = []
    for attempt in range(8):
        keep_alive.append(bytearray(7919 * (attempt + 1)))
        assert encode_mp4(frames.copy(), fps=16) == first


def test_single_frame() -> None:
    frames = _gradient_video(num_frames=1, height=16, width=16)
    assert decode_mp4(encode_mp4(frames, fps=24)).shape == (1, 16, 16, 3)


@pytest.mark.parametrize("size", [(33, 48), (32, 47)])
def test_encode_rejects_odd_size(size: tuple[int, int]) -> None:
    frames = np.zeros((2, *size, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="even"):
        encode_mp4(frames, fps=16)


@pytest.mark.parametrize(
    ("frames", "fps"),
    [
        (np.zeros((2, 16, 16, 3), dtype=np.float32), 16),
        (np.zeros((2, 16, 16, 4), dtype=np.uint8), 16),
        (np.zeros((16, 16, 3), dtype=np.uint8), 16),
        (np.zeros((0, 16, 16, 3), dtype=np.uint8), 16),
        (np.zeros((2, 16, 16, 3), dtype=np.uint8), 0),
        (np.zeros((2, 16, 16, 3), dtype=np.uint8), 16.0),
    ],
)
def test_encode_rejects_bad_input(frames: np.ndarray, fps: int) -> None:
    with pytest.raises(ValueError):
        encode_mp4(frames, fps=fps)
