"""benchmarks/vae_mp4.py on CPU at the smallest size: the GPU benchmark of the VAE decode and MP4 encode runs end to
end (A14B's VAE with random weights, fp32 and the half precisions asked for, each preset asked for, one after the
other and encoding while decoding) and records every row. One half precision and two presets keep it short; the
loops are the same for every precision and preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vae_mp4.py"


def test_records_every_decode_encode_and_overlapped_row(tmp_path):
    out = tmp_path / "vae_mp4.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--repeat", "1", "--out", str(out)]
    # `fast` (the default preset, the baseline's) runs whether asked for or not.
    cmd += ["--presets", "veryfast", "--halves", "fp16"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    record = json.loads(out.read_text())
    presets = ["fast", "veryfast"]
    assert set(record["decode"]) == {"fp32", "fp16"}
    assert set(record["encode"]) == set(presets)
    # The script itself asserts each overlapped MP4 equals encode_mp4 of its frames.
    assert set(record["while_decoding"]) == {"fp32_fast", *(f"fp16_{p}" for p in presets)}
    assert 0 <= record["fp16_vs_fp32_levels"]["mean"] <= record["fp16_vs_fp32_levels"]["max"]
    for row in record["encode"].values():
        assert row["bytes"] > 0 and 10 < row["psnr_db"] < 100, row
    assert all(row["together_s"] > 0 for row in record["while_decoding"].values())
    assert all(row["decode_to_frames_s"] > 0 and row["first_s"] > 0 for row in record["decode"].values())
