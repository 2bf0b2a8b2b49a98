"""benchmarks/family_step.py on CPU with tiny I2V and TI2V checkpoints: both variants run the kind's real step
(I2V's 36-channel input, TI2V's per-token timesteps with and without an image) and the record says what it timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "family_step.py"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("family_step")
    return {kind: make_tiny_checkpoint(root / kind, TinyConfig(kind=kind)) for kind in ("i2v", "ti2v")}


@pytest.mark.parametrize(
    ("kind", "size", "extra", "tokens"),
    [
        # 32x48 pixels / 8 / 2x2 patch, 9 frames -> 3 latent frames: 3 x 2 x 3 tokens.
        ("i2v", (32, 48, 9), [], 18),
        # 64x96 pixels / 16 / 2x2 patch, 5 frames -> 2 latent frames: 2 x 2 x 3 tokens.
        ("ti2v", (64, 96, 5), [], 12),
        ("ti2v", (64, 96, 5), ["--image"], 12),
    ],
    ids=["i2v", "ti2v", "ti2v-image"],
)
def test_times_both_steps(checkpoints, tmp_path, kind, size, extra, tokens):
    out = tmp_path / "step.json"
    height, width, frames = size
    cmd = [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoints[kind]), "--device", "cpu"]
    cmd += ["--height", str(height), "--width", str(width), "--num-frames", str(frames), "--repeat", "1", *extra]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["kind"] == kind.upper() and result["tokens"] == tokens
    assert result["image"] == (kind == "i2v" or bool(extra))
    assert set(result["variants"]) == {"diffusers", "ours_reference"}
    assert all(v["step_s"] > 0 and len(v["times"]) == 1 for v in result["variants"].values())
