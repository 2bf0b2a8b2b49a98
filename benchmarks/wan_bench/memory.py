"""Device memory: what this process holds (PyTorch's allocator), its peak over a measurement, and the whole GPU's
use as nvidia-smi reports it (every process, e.g. a server's), sampled in the background."""

from __future__ import annotations

import contextlib
import gc
import shutil
import subprocess
import threading

import torch


def allocated(device: torch.device) -> int:
    """Bytes PyTorch's allocator holds on `device` (0 on the CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory measurement: resets the peak; returns the bytes allocated now (`peak_above`'s base)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return allocated(device)


def peak_above(device: torch.device, base: int) -> int | None:
    """Peak bytes allocated since `reset_peak`, above its base; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Free what the last measurement left behind before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class GpuMemorySampler:
    """Samples `nvidia-smi --query-gpu=memory.used` (MiB, whole GPU, every process) every `period_s` seconds in a
    background thread; `reset()` returns the peak since the last reset. Where there is no nvidia-smi (a CPU
    machine), `available` is False and the peak stays None."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.available = shutil.which("nvidia-smi") is not None
        self.peak_mib: float | None = 0.0 if self.available else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.peak_mib = max(self.peak_mib or 0.0, max(float(v) for v in out.split()))
            self._stop.wait(self.period_s)

    def reset(self) -> float | None:
        peak = self.peak_mib
        self.peak_mib = 0.0 if self.available else None
        return peak

    def __enter__(self) -> GpuMemorySampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
