"""The MP4's x264 settings as deployment keys (`video: {x264_preset, x264_crf, x264_tune}`): each preset gives a valid
MP4 close to the frames, the settings change the bytes, `zerolatency` codes without B-frames and its MP4 is complete
as soon as the last frame is handed over, and bad values are refused by the deployment and the encoder."""

from __future__ import annotations

import io
import typing

import av
import numpy as np
import pytest
from av.video.frame import PictureType
from pydantic import ValidationError

from factories import load_deployment
from wan_triton.config.deployment import Deployment, Video
from wan_triton.model.video import X264_TUNES, Mp4Encoder, decode_mp4, encode_mp4


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


def _picture_types(data: bytes) -> set[str]:
    with av.open(io.BytesIO(data)) as container:
        return {PictureType(frame.pict_type).name for frame in container.decode(container.streams.video[0])}


def test_zerolatency_codes_without_b_frames_or_a_lookahead():
    frames = np.concatenate([_frames()] * 4)  # 20 frames: room for x264's B-frames and lookahead
    default = encode_mp4(frames, 16, preset="veryfast")
    zerolatency = encode_mp4(frames, 16, preset="veryfast", tune="zerolatency")
    assert "B" in _picture_types(default)
    assert "B" not in _picture_types(zerolatency)
    assert np.abs(_luma(decode_mp4(zerolatency)) - _luma(frames)).mean() < 3
    # As encode_while_decoding hands it the frames, a chunk at a time: the same bytes (x264 slices each frame by
    # thread under zerolatency, a fixed split for the fixed thread count).
    chunked = Mp4Encoder(16, "veryfast", 17, "zerolatency")
    for start in range(0, len(frames), 4):
        chunked.add(frames[start : start + 4])
    assert chunked.finish() == zerolatency == encode_mp4(frames, 16, preset="veryfast", tune="zerolatency")
    # Without a lookahead x264 hands out each frame's packet as the frame goes in: after the last frame, finishing
    # the MP4 encodes nothing more. With the default tune, frames are still held back at that point.
    for tune, held_back in ((None, True), ("zerolatency", False)):
        encoder = Mp4Encoder(16, "veryfast", 17, tune)
        encoder.add(frames)
        packets = encoder._stream.encode(None)
        encoder.close()
        assert (len(packets) > 0) == held_back, (tune, len(packets))


def test_the_deployment_offers_the_encoders_tunes():
    annotation = Video.model_fields["x264_tune"].annotation
    (choices,) = [typing.get_args(a) for a in typing.get_args(annotation) if a is not type(None)]
    assert choices == X264_TUNES


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="preset"):
        encode_mp4(_frames(), 16, preset="ludicrous")
    with pytest.raises(ValueError, match="crf"):
        encode_mp4(_frames(), 16, crf=60)
    with pytest.raises(ValueError, match="tune"):
        encode_mp4(_frames(), 16, tune="fastest")
    data = load_deployment("cpu").model_dump(mode="json")
    assert Deployment.model_validate(data).video.x264_preset == "fast"
    for bad in ({"x264_preset": "ludicrous"}, {"x264_crf": 52}, {"x264_tune": "fastest"}):
        with pytest.raises(ValidationError, match="x264"):
            Deployment.model_validate({**data, "video": bad})
