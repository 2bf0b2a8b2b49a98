"""benchmarks/mp4_encode.py at the smallest size: every (noise, preset, tune) row is recorded with its wait after the
last chunk, its size and its PSNR, and each MP4 decodes to the frames it was made from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mp4_encode.py"


def test_records_a_row_per_noise_preset_and_tune(tmp_path):
    out = tmp_path / "mp4_encode.json"
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--num-frames", "21", "--chunk-s", "0.01", "--repeat", "2"]
    cmd += ["--presets", "veryfast", "ultrafast", "--noise", "6", "40", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    rows = {(row["noise"], row["preset"], row["tune"]) for row in record["rows"]}
    assert rows == {(n, p, t) for n in (6.0, 40.0) for p in ("veryfast", "ultrafast") for t in ("none", "zerolatency")}
    for row in record["rows"]:
        assert 0 <= row["tail_s"] <= row["total_s"] and len(row["tail_times"]) == 2, row
        assert row["bytes"] > 0 and 10 < row["psnr_db"] < 100, row
    # More noise, lower fidelity at the same CRF: the PSNR is of the frames the MP4 was made from.
    by = {(row["noise"], row["preset"], row["tune"]): row["psnr_db"] for row in record["rows"]}
    assert by[40.0, "veryfast", "none"] < by[6.0, "veryfast", "none"]
