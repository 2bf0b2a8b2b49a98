"""The MP4's x264 settings as deployment keys (`video: {x264_preset, x264_crf}`): each preset gives a valid MP4 close
to the frames, the settings change the bytes, and bad values are refused by the deployment and the encoder."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from factories import load_deployment
from wan_triton.config.deployment import Deployment
from wan_triton.model.video import decode_mp4, encode_mp4


def _frames() -> np.ndarray:
    y, x = np.mgrid[0:32, 0:48]
    return np.stack([np.stack([(x * 5 + t * 9) % 256, (y * 7) % 256, (x + y + t) % 256], -1) for t in range(5)]).astype(
        np.uint8
    )


def _luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


@pytest.mark.parametrize("preset", ["ultrafast", "fast", "medium"])
def test_each_preset_encodes_close_to_the_frames(preset):
    frames = _frames()
    decoded = decode_mp4(encode_mp4(frames, 16, preset=preset, crf=17))
    assert decoded.shape == frames.shape
    assert np.abs(_luma(decoded) - _luma(frames)).mean() < 3


def test_settings_change_the_stream():
    frames = _frames()
    default = encode_mp4(frames, 16)
    assert encode_mp4(frames, 16, preset="fast", crf=17) == default
    assert encode_mp4(frames, 16, preset="ultrafast") != default
    assert len(encode_mp4(frames, 16, crf=40)) < len(default)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="preset"):
        encode_mp4(_frames(), 16, preset="ludicrous")
    with pytest.raises(ValueError, match="crf"):
        encode_mp4(_frames(), 16, crf=60)
    data = load_deployment("cpu").model_dump(mode="json")
    assert Deployment.model_validate(data).video.x264_preset == "fast"
    for bad in ({"x264_preset": "ludicrous"}, {"x264_crf": 52}):
        with pytest.raises(ValidationError, match="x264"):
            Deployment.model_validate({**data, "video": bad})
