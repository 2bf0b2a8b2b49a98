"""JSON result records: what every result file says about the run that wrote it.

`run_record()` is the head of every record: the device measured, the commit (`$COMMIT` where set, e.g. on a host
that has the working tree without its .git, else `git rev-parse --short HEAD`), the exact command line, a
timestamp, and the Python and torch versions. `write_json` writes a record, creating its folder.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def commit() -> str:
    """`$COMMIT`, else the short hash of this checkout's HEAD, else "unknown"."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def cpu_name() -> str:
    return f"CPU ({os.cpu_count()} cores)"


def gpu_name() -> str | None:
    """The first GPU's name as nvidia-smi reports it, or None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return names[0].strip() if names else None


def device_name(device: Any = None) -> str:
    """The device a measurement ran on. `device` (a torch device or its name): what this process computes on. None:
    the machine's accelerator, for benchmarks that measure a server (`$DEVICE` where set, else the first GPU,
    else the CPU)."""
    if device is None:
        return os.environ.get("DEVICE") or gpu_name() or cpu_name()
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran, as typed (interpreter, script or -m module, arguments); `argv`: the arguments a `main`
    was called with in-process, after the program's name."""
    if argv is not None:
        return shlex.join([Path(sys.argv[0]).name, *argv])
    interpreter, *rest = sys.orig_argv
    return shlex.join([Path(interpreter).name, *rest])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_record(device: str | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The head of a result record. `device`: its name where the caller knows better than `device_name()` (e.g.
    "2x NVIDIA H200"); `argv`: as for `command_line`."""
    return {
        "device": device or device_name(),
        "commit": commit(),
        "command": command_line(argv),
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": _version("torch"),
    }


def write_json(path: Path, record: Any) -> None:
    """Write `record` as indented JSON, creating the folder; rewritten after each part of a run, a file cut short
    keeps the parts that finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
