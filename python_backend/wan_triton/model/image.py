"""The conditioning image of an image-to-video request: decoded from the request's bytes and resized to the video's
size, as diffusers prepares it (`diffusers.utils.load_image`, then `VideoProcessor.preprocess`).

Everything happens in memory; the bytes never touch the disk. Only PNG, JPEG and WebP are read. The pixel limit is
checked from the file's header, before any pixel is decoded, so a small file declaring a huge image (a decompression
bomb) is refused without the memory its pixels would take.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wan_triton.config.request import InvalidRequestError

FIELD = "image"
# Pillow's format names. MPO is the multi-picture JPEG many phone cameras write: a JPEG file, read as its first picture.
ALLOWED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP"}
ALLOWED = "a PNG, JPEG or WebP file"
# diffusers' VaeImageProcessor defaults (`resample="lanczos"`, `reducing_gap=None`), used by VideoProcessor.preprocess.
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = None


def decode_image(data: bytes, max_image_bytes: int, max_image_pixels: int) -> Image.Image:
    """The RGB image in `data`, upright (EXIF orientation applied), as `diffusers.utils.load_image` reads a file.

    Raises InvalidRequestError("image", ...) for empty, oversized, undecodable or unsupported data.
    """
    if not data:
        raise InvalidRequestError(FIELD, f"must be {ALLOWED}; got 0 bytes")
    if len(data) > max_image_bytes:
        raise InvalidRequestError(FIELD, f"must be at most {max_image_bytes} bytes; got {len(data)}")
    try:
        # Pillow's own bomb check (a warning, or an error far above its own limit) runs inside `open`; the
        # deployment's pixel limit below is the one that applies, so Pillow's is kept quiet and its error mapped.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            kind = ALLOWED_FORMATS.get(image.format or "")
            if kind is None:
                raise InvalidRequestError(FIELD, f"must be {ALLOWED}; got a {image.format} image")
            width, height = image.size
            if width * height > max_image_pixels:
                raise InvalidRequestError(
                    FIELD, f"must have at most {max_image_pixels} pixels; got {width}x{height}={width * height}"
                )
            image.load()
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except InvalidRequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidRequestError(
            FIELD, f"must have at most {max_image_pixels} pixels; got a larger one ({exc})"
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequestError(FIELD, f"must be {ALLOWED}; these {len(data)} bytes are not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated or corrupt pixel data: Pillow raises these from `load`.
        raise InvalidRequestError(FIELD, f"must be {ALLOWED}; could not decode it ({exc})") from None


def resize_image(image: Image.Image, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: `image` stretched to exactly width x height (no crop), as diffusers'
    `VaeImageProcessor.resize` does in its default mode."""
    resized = image.convert("RGB").resize((width, height), resample=RESAMPLE, reducing_gap=REDUCING_GAP)
    return np.asarray(resized, dtype=np.uint8)


def condition_image(
    data: bytes | None, width: int, height: int, max_image_bytes: int, max_image_pixels: int
) -> np.ndarray:
    """The request's image decoded and resized to the video's size, uint8 [height, width, 3]; [0, 0, 3] without one."""
    if data is None:
        return np.zeros((0, 0, 3), dtype=np.uint8)
    return resize_image(decode_image(data, max_image_bytes, max_image_pixels), width, height)
