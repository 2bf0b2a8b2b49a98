"""What the MP4 benchmarks share: the x264 tunes as command-line choices, and the PSNR of a decoded MP4."""

from __future__ import annotations

import argparse

import numpy as np

from wan_triton.model.video import X264_TUNES

# "none" on the command line: x264's default, no tune (`tune=None` to the encoders).
NO_TUNE = "none"


def add_tunes_argument(parser: argparse.ArgumentParser) -> None:
    """`--tunes`: the x264 tunes to run, each a name of `X264_TUNES` or "none"; without and with zerolatency by
    default."""
    parser.add_argument("--tunes", nargs="+", default=[NO_TUNE, "zerolatency"], choices=[NO_TUNE, *X264_TUNES])


def tune_of(name: str) -> str | None:
    """The encoders' `tune` argument for a `--tunes` name."""
    return None if name == NO_TUNE else name


def psnr_db(decoded: np.ndarray, frames: np.ndarray) -> float:
    """PSNR in dB of uint8 frames against the originals, over every pixel and channel."""
    mse = float(np.mean((decoded.astype(np.float64) - frames) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
