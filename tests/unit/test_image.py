"""The `image` input's decoding and resizing (wan_triton.model.image) against diffusers' own: `load_image` for the
decode and `VideoProcessor.preprocess` (what `WanImageToVideoPipeline` runs) for the resize, pixel for pixel; and
every refusal, each an InvalidRequestError naming `image`."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from diffusers.utils import load_image
from diffusers.video_processor import VideoProcessor
from PIL import Image

from wan_triton.config.request import InvalidRequestError
from wan_triton.model.image import condition_image, decode_image, resize_image

MAX_BYTES = 1 << 20
MAX_PIXELS = 1024 * 1024
# The video size the image is stretched to (a multiple of 16, another aspect ratio than the source).
HEIGHT, WIDTH = 48, 80


def _pattern(width: int = 61, height: int = 37) -> np.ndarray:
    """A uint8 RGB image with detail in every channel (so a resize or a channel mix-up shows)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, (255 - x * 5) % 256], axis=-1).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _rgb() -> Image.Image:
    return Image.fromarray(_pattern())


def _exif_rotated_jpeg() -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise), as cameras write."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_rgb(), "JPEG", quality=95, exif=exif)


FILES = {
    "png": lambda: _encode(_rgb(), "PNG"),
    "jpeg": lambda: _encode(_rgb(), "JPEG", quality=90),
    "webp": lambda: _encode(_rgb(), "WEBP", quality=90),
    "webp_lossless": lambda: _encode(_rgb(), "WEBP", lossless=True),
    "greyscale_png": lambda: _encode(_rgb().convert("L"), "PNG"),
    "greyscale_jpeg": lambda: _encode(_rgb().convert("L"), "JPEG"),
    "palette_png": lambda: _encode(_rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
    "rgba_png": lambda: _encode(Image.fromarray(np.dstack([_pattern(), _pattern()[..., :1] * 0 + 128])), "PNG"),
    "rgba_webp": lambda: _encode(Image.fromarray(np.dstack([_pattern(), _pattern()[..., :1]])), "WEBP", lossless=True),
    "cmyk_jpeg": lambda: _encode(_rgb().convert("CMYK"), "JPEG", quality=95),
    "exif_rotated_jpeg": _exif_rotated_jpeg,
}


def _diffusers_pixels(data: bytes, width: int, height: int) -> np.ndarray:
    """What WanImageToVideoPipeline conditions on: `load_image`, then `VideoProcessor.preprocess` ([-1, 1] floats),
    back to the uint8 values it started from."""
    image = load_image(Image.open(io.BytesIO(data)))
    processor = VideoProcessor(vae_scale_factor=8)
    pixels = processor.preprocess(image, height=height, width=width)  # [1, 3, H, W] in [-1, 1]
    assert pixels.shape == (1, 3, height, width)
    unit = (pixels[0].permute(1, 2, 0).double() + 1) / 2  # back to [0, 1]: x / 255 exactly, up to float32 rounding
    return torch.round(unit * 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("kind", list(FILES))
def test_decode_and_resize_equal_diffusers(kind):
    data = FILES[kind]()
    decoded = decode_image(data, MAX_BYTES, MAX_PIXELS)
    reference = load_image(Image.open(io.BytesIO(data)))
    assert decoded.mode == "RGB" and decoded.size == reference.size
    assert np.array_equal(np.asarray(decoded), np.asarray(reference))
    pixels = resize_image(decoded, WIDTH, HEIGHT)
    assert pixels.dtype == np.uint8 and pixels.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(pixels, _diffusers_pixels(data, WIDTH, HEIGHT))


def test_exif_orientation_is_applied():
    decoded = decode_image(_exif_rotated_jpeg(), MAX_BYTES, MAX_PIXELS)
    height, width = _pattern().shape[:2]
    assert decoded.size == (height, width)  # turned upright: the stored width becomes the height


def test_greyscale_becomes_three_equal_channels():
    pixels = resize_image(decode_image(FILES["greyscale_png"](), MAX_BYTES, MAX_PIXELS), WIDTH, HEIGHT)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])


def test_same_size_is_unchanged_and_no_image_is_empty():
    data = FILES["png"]()
    height, width = _pattern().shape[:2]
    assert np.array_equal(condition_image(data, width, height, MAX_BYTES, MAX_PIXELS), _pattern())
    empty = condition_image(None, WIDTH, HEIGHT, MAX_BYTES, MAX_PIXELS)
    assert empty.shape == (0, 0, 3) and empty.dtype == np.uint8


def _refused(data: bytes, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(InvalidRequestError) as info:
        decode_image(data, max_bytes, max_pixels)
    assert info.value.field == "image"
    message = str(info.value)
    assert message.startswith("image: ")
    return message


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_naming_what_is_allowed(fmt):
    message = _refused(_encode(_rgb(), fmt))
    assert "PNG, JPEG or WebP" in message and fmt in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "got 0 bytes"),
        (b"this is not an image at all", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG, JPEG or WebP"),
    ],
    ids=["empty", "text", "png_signature_only"],
)
def test_undecodable_bytes_are_refused(data, expected):
    assert expected in _refused(data)


@pytest.mark.parametrize("kind", ["png", "jpeg", "webp"])
def test_truncated_files_are_refused(kind):
    data = FILES[kind]()
    message = _refused(data[: len(data) // 2])
    assert "PNG, JPEG or WebP" in message


def test_too_many_bytes_is_refused_before_decoding():
    data = FILES["png"]()
    assert f"at most {len(data) - 1} bytes; got {len(data)}" in _refused(data, max_bytes=len(data) - 1)
    assert decode_image(data, len(data), MAX_PIXELS).size == (61, 37)  # the limit is inclusive


def test_too_many_pixels_is_refused():
    data = FILES["png"]()
    assert "at most 2000 pixels; got 61x37=2257" in _refused(data, max_pixels=2000)
    assert decode_image(data, MAX_BYTES, 61 * 37).size == (61, 37)  # the limit is inclusive


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with a few bytes of zlib data: decoded it would take
    width x height x 3 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * 1024))  # one row's worth; a real bomb repeats it, cheaply
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "side",
    [30_000, 60_000],  # 2.7 GB and 10.8 GB decoded; the second is above Pillow's own bomb error threshold
)
def test_decompression_bomb_is_refused_from_the_header_without_allocating(side):
    data = _png_bomb(side, side)
    assert len(data) < 200
    tracemalloc.start()
    started = time.perf_counter()
    try:
        message = _refused(data, max_pixels=4096 * 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 0.5
    assert peak < 1 << 20, f"refusing the bomb allocated {peak} bytes"
    assert f"at most {4096 * 4096} pixels" in message


def test_pillow_bomb_warning_does_not_leak(recwarn):
    """A header above Pillow's own warning threshold (89.5 M pixels) but below its error: Pillow warns while opening
    it; the warning stays inside, and the refusal is the deployment's."""
    message = _refused(_png_bomb(10_000, 10_000), max_pixels=10**8 - 1)
    assert "got 10000x10000" in message
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
