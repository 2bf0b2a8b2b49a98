"""Timing loops with warm-up: CUDA events on the GPU's own clock, wall clock around a device synchronisation, and
the slowest rank of a process group."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_seconds(fn: Callable[[], Any]) -> float:
    """Seconds of one call of `fn` between two CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_cuda(fn: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls (CUDA events), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return [cuda_seconds(fn) for _ in range(repeat)]


def median_cuda(fn: Callable[[], Any], warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds of `time_cuda`."""
    return statistics.median(time_cuda(fn, warmup, repeat))


def time_wall(
    fn: Callable[[], Any], device: torch.device, repeat: int, after_warmup: Callable[[], Any] | None = None
) -> tuple[float, list[float]]:
    """(seconds of one warm-up call, seconds of each of `repeat` timed calls) of `fn` in this process, each call's
    time measured on the wall clock up to the device's synchronisation; `after_warmup()` runs between them (e.g.
    to reset peak-memory statistics)."""
    started = time.perf_counter()
    fn()
    sync(device)
    warmup_s = time.perf_counter() - started
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(repeat):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return warmup_s, times


def time_slowest_rank(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Median over `repeat` calls of the slowest rank's time for `fn` in the default process group (every rank
    enters each call together, after a barrier)."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        dist.barrier()
        started = time.perf_counter()
        fn()
        sync(device)
        # On the rank's device: NCCL reduces device tensors only.
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times)


def gemm_tflops(n: int = 8192) -> float:
    """This GPU's bf16 matmul rate (TFLOP/s) at n x n x n."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / statistics.median(time_cuda(lambda: a @ b, warmup=5, repeat=20)) / 1e12
