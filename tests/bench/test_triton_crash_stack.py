"""tools/triton_crash_stack.py names the Python backend's functions in a real crash stack: the server log of the
crash that the metric lock fixed (benchmarks/results/diagnostics/tritonserver_crash_2026-11-24.log) against the
installed Triton wheel's libtriton_python.so, which printed it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "triton_crash_stack.py"
CRASH_LOG = ROOT / "benchmarks" / "results" / "diagnostics" / "tritonserver_crash_2026-11-24.log"

pytestmark = pytest.mark.skipif(not shutil.which("objdump") or not shutil.which("nm"), reason="needs binutils")


def test_the_recorded_crash_is_in_the_metric_path():
    run = subprocess.run([sys.executable, str(SCRIPT), str(CRASH_LOG)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    frames = [line.strip() for line in run.stdout.splitlines()[1:]]
    assert len(frames) == 5
    expected = [
        "PbString::LoadFromSharedMemory",
        "Metric::LoadFromSharedMemory",
        "ProcessMessage<triton::backend::python::Metric",
        "ProcessMetricRequest",
        "StubToParentMQMonitor",
    ]
    for frame, name in zip(frames, expected, strict=True):
        assert name in frame, (frame, name)


def test_a_log_without_frames_is_refused(tmp_path):
    log = tmp_path / "tritonserver.log"
    log.write_text("I1124 server started\n")
    run = subprocess.run([sys.executable, str(SCRIPT), str(log)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "no frames in libtriton_python.so" in run.stderr
