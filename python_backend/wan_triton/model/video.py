"""Encode uint8 RGB frames as an H.264 MP4, and decode such an MP4 back to frames (PyAV and numpy only: the
postprocess step runs no model and does without torch). The VAE's output becomes such frames in `frames`."""

from __future__ import annotations

import functools
import io
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Colorspace

logger = logging.getLogger(__name__)

# High quality: at CRF 17 x264 output is visually lossless, so a decoded MP4 stays within a few levels of the frames.
X264_CRF = 17
X264_PRESET = "fast"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# x264's tunes. `zerolatency` drops the lookahead and B-frames, so each frame is coded as it arrives: the MP4 is ready
# as soon as the last frame is encoded instead of a lookahead's worth of frames later (benchmarks/mp4_encode.py).
X264_TUNES = ("film", "animation", "grain", "stillimage", "fastdecode", "zerolatency")
# A fixed thread count, not x264's CPU-count-based "auto": x264 is deterministic for a given thread count, so the same
# frames give the same bytes on any host. Four threads keep a 720p, 81-frame encode to a few seconds.
X264_THREADS = 4
# x264's AVX-512 code paths make its output depend on uninitialised memory (measured with x264 core 165: repeated
# encodes of identical frames gave different bytes, even single-threaded, unless AVX-512 was off), so on CPUs that
# have AVX-512 the encoder is capped at AVX2, which every AVX-512 CPU also has. Speed is the same within noise.
_X264_ASM_CAP = "asm=AVX2"

# libavutil enum values (AVColorSpace, AVColorPrimaries, AVColorTransferCharacteristic, AVColorRange). The frames are
# converted to YUV with the BT.709 matrix and tagged as such, so players (which assume BT.709 for HD) show the colours
# the model made, and decoders that honour the tag (PyAV does) invert the same matrix.
_AVCOL_SPC_BT709 = 1
_AVCOL_PRI_BT709 = 1
_AVCOL_TRC_BT709 = 1
_AVCOL_RANGE_MPEG = 1  # limited ("TV") range, what yuv420p H.264 players expect


def encode_mp4(
    frames: np.ndarray, fps: int, preset: str = X264_PRESET, crf: int = X264_CRF, tune: str | None = None
) -> bytes:
    """Encode uint8 RGB frames [F, H, W, 3] as an H.264 (yuv420p) MP4 with the index up front (faststart), with
    x264's `preset` (speed against size), `crf` (quality: lower is closer to the frames) and `tune` (None: none)."""
    encoder = Mp4Encoder(fps, preset, crf, tune)
    try:
        encoder.add(frames)
        return encoder.finish()
    finally:
        encoder.close()


class Mp4Encoder:
    """`encode_mp4` a chunk of frames at a time: `add` each chunk [f, H, W, 3] in order, then `finish` for the MP4.
    The bytes equal `encode_mp4` of all the frames at once (x264 sees the same frames in the same order)."""

    def __init__(self, fps: int, preset: str = X264_PRESET, crf: int = X264_CRF, tune: str | None = None) -> None:
        if isinstance(fps, bool) or not isinstance(fps, int | np.integer) or fps <= 0:
            raise ValueError(f"fps must be a positive integer, got {fps!r}")
        self.fps = int(fps)
        # The frames' time base; the stream's own changes when the muxer writes the header (mp4: 1/16384).
        self.time_base = Fraction(1, self.fps)
        self.options = _x264_options(preset, crf, tune)
        self.num_frames = 0
        self._buffer = io.BytesIO()
        self._container = None
        self._stream = None

    def _open(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            # yuv420p halves chroma resolution in both directions; x264 rejects odd sizes.
            raise ValueError(f"height and width must be even for yuv420p H.264, got {height}x{width}")
        buffer = self._buffer
        # movflags=+faststart makes the muxer reopen its own output to move the index before the media data; with an
        # in-memory output it needs that reopen served by io_open.
        self._container = av.open(
            buffer,
            mode="w",
            format="mp4",
            options={"movflags": "+faststart"},
            io_open=lambda url, flags, options: _BytesIOReader(buffer),
        )
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.time_base = self.time_base
        stream.options = dict(self.options)
        codec = stream.codec_context
        codec.colorspace = _AVCOL_SPC_BT709
        codec.color_primaries = _AVCOL_PRI_BT709
        codec.color_trc = _AVCOL_TRC_BT709
        codec.color_range = _AVCOL_RANGE_MPEG
        self._stream = stream

    def add(self, frames: np.ndarray) -> None:
        """Encode the next uint8 RGB frames [f, H, W, 3] (every chunk of one size)."""
        _check_frames(frames)
        _, height, width, _ = frames.shape
        if self._stream is None:
            self._open(height, width)
        elif (height, width) != (self._stream.height, self._stream.width):
            raise ValueError(
                f"frames are {height}x{width}, but the video is {self._stream.height}x{self._stream.width}"
            )
        for rgb_frame in frames:
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb_frame), format="rgb24")
            frame = rgb.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709)
            frame.colorspace = _AVCOL_SPC_BT709
            frame.color_primaries = _AVCOL_PRI_BT709
            frame.color_trc = _AVCOL_TRC_BT709
            frame.color_range = _AVCOL_RANGE_MPEG
            frame.pts = self.num_frames
            frame.time_base = self.time_base
            self._container.mux(self._stream.encode(frame))
            self.num_frames += 1

    def finish(self) -> bytes:
        """Flush the encoder, write the index and return the MP4."""
        if self._stream is None:
            raise ValueError("frames must hold at least one frame")
        self._container.mux(self._stream.encode(None))  # flush the encoder's delayed frames
        self._container.close()
        self._container = None
        return self._buffer.getvalue()

    def close(self) -> None:
        """Release the encoder without an MP4 (after an error); a no-op after `finish`."""
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
                logger.debug("closing an unfinished MP4 failed", exc_info=True)


class BackgroundMp4Encoder:
    """An `Mp4Encoder` fed from one worker thread, so the frames encode while the caller makes the next ones (x264
    and libswscale run outside the GIL). `add` returns at once; `finish` waits for the MP4 and raises the first
    error of any chunk."""

    def __init__(self, fps: int, preset: str = X264_PRESET, crf: int = X264_CRF, tune: str | None = None) -> None:
        self._encoder = Mp4Encoder(fps, preset, crf, tune)
        # One worker: the chunks are encoded in the order they were added.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mp4")
        self._pending: list[Future] = []

    def add(self, frames: np.ndarray) -> None:
        self._pending.append(self._pool.submit(self._encoder.add, frames))

    def finish(self) -> bytes:
        try:
            for future in self._pending:
                future.result()
            return self._pool.submit(self._encoder.finish).result()
        finally:
            self.close()

    def close(self) -> None:
        """Stop (dropping chunks not yet encoded) and release the encoder; safe to call again."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._encoder.close()


def decode_mp4(data: bytes) -> np.ndarray:
    """Decode the first video stream of an MP4 to uint8 RGB frames [F, H, W, 3]."""
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise ValueError("the data holds no video stream")
        # PyAV converts with the colour matrix the stream is tagged with (BT.709 for encode_mp4's output).
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]
    if not frames:
        raise ValueError("the video stream holds no frames")
    return np.stack(frames)


@functools.cache
def _x264_options(preset: str, crf: int, tune: str | None = None) -> dict[str, str]:
    if preset not in X264_PRESETS:
        raise ValueError(f"x264 preset must be one of {X264_PRESETS}, got {preset!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"x264 crf must be an integer in [0, 51], got {crf!r}")
    if tune is not None and tune not in X264_TUNES:
        raise ValueError(f"x264 tune must be one of {X264_TUNES} or none, got {tune!r}")
    options = {"crf": str(crf), "preset": preset, "threads": str(X264_THREADS)}
    if tune is not None:
        options["tune"] = tune
    if _cpu_has_avx512():
        options["x264-params"] = _X264_ASM_CAP
    return options


def _cpu_has_avx512() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        # Not Linux: x264 keeps its own CPU detection; output may then vary between runs on AVX-512 hosts.
        logger.warning("cannot read /proc/cpuinfo; H.264 output may not be byte-identical across runs")
        return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "avx512f" in line.split(":", 1)[-1].split()
    return False


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must have shape [F, H, W, 3], got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("frames must hold at least one frame")


class _BytesIOReader(io.RawIOBase):
    """A read-only view of a BytesIO with its own position, leaving the writer's position untouched."""

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__()
        self._buffer = buffer
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:
        writer_position = self._buffer.tell()
        try:
            self._buffer.seek(self._position)
            count = self._buffer.readinto(target)
        finally:
            self._buffer.seek(writer_position)
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._position = offset
        elif whence == io.SEEK_CUR:
            self._position += offset
        elif whence == io.SEEK_END:
            writer_position = self._buffer.tell()
            self._position = self._buffer.seek(0, io.SEEK_END) + offset
            self._buffer.seek(writer_position)
        else:
            raise ValueError(f"invalid whence {whence}")
        return self._position

    def tell(self) -> int:
        return self._position
