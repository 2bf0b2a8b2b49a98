"""A small load test (benchmarks/load_test.py) against the session's real server: 8 concurrent clients, 24
requests of two shapes. No request may fail, every output must equal the same request served alone, and the
server's resident memory (tritonserver and its Python stubs) must not grow from the first to the last 8 requests.
The full run (32 clients, 200 requests, four shapes) and its figures are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"

pytestmark = pytest.mark.server

# A short run measures fewer, noisier samples than the 200-request benchmark (5%); a leak of even 1 MB per
# request across three models' stubs would still show far above this.
MAX_GROWTH_PCT = 10.0


def test_concurrent_mixed_load_is_correct_and_does_not_grow(server, tmp_path):
    args = ["--url", server.grpc_url, "--model", "wan_onnx", "--shapes", "64x64x5x4", "48x80x9x6"]
    args += ["--seeds-per-shape", "2", "--clients", "8", "--requests", "24", "--window", "8"]
    args += ["--max-growth-pct", str(MAX_GROWTH_PCT), "--server-pid", str(server.process.pid)]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "load.json")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert (tmp_path / "load.json").exists(), run.stdout + run.stderr
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["completed"] == 24
    assert report["failures"] == 0, report["failure_messages"]
    assert report["identical_to_alone"] == 24
    memory = report["memory"]
    assert memory["first_window_samples"] > 0 and memory["last_window_samples"] > 0
    # The stubs of five models per rendering are hundreds of MB each: a real process tree was measured.
    assert memory["first_window_mean_mb"] > 500
    assert memory["growth_pct"] <= MAX_GROWTH_PCT, memory
    assert report["passed"] and run.returncode == 0, run.stdout + run.stderr
