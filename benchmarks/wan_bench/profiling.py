"""Where GPU time goes: CUDA kernel time from `torch.profiler`, by kernel and by kind of kernel."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch


def kernel_category(name: str) -> str:
    """attention, gemm, fused elementwise (inductor) or other, from a kernel's name."""
    low = name.lower()
    if low.startswith("triton"):  # inductor names its kernels after the ops fused in, attention ones included
        return "fused elementwise (inductor)"
    if "flash" in low or "fmha" in low or "attention" in low or "cudnn" in low:
        return "attention"
    if any(key in low for key in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_")):
        return "gemm"
    return "other"


def is_layout_copy(name: str) -> bool:
    """A kernel that only moves data (a heuristic on names: inductor's `clone` kernels, ATen's copy and cat
    kernels; not `_to_copy`, a cast that inductor fuses into norms, and not the memcpys, `is_device_copy`)."""
    low = name.lower()
    return any(key in low for key in ("clone", "direct_copy", "catarray"))


def is_device_copy(name: str) -> bool:
    """A device-to-device memcpy as the profiler names it: "Memcpy DtoD (Device -> Device)", or the driver's copy
    kernel "memcpy128" (and its kin), which the same copies of a replayed CUDA graph appeared as at commit 504ab62."""
    return name.startswith("Memcpy DtoD") or re.fullmatch(r"memcpy\d+", name) is not None


def kernel_times(prof, calls: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """From a `torch.profiler` run of `calls` calls: per kernel name [ms per call, launches], and ms per call by
    `kernel_category` (each kernel's own device time; gaps between kernels are not counted)."""
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += event.device_time_total / 1e3 / calls  # us -> ms per call
            entry[1] += 1
    by_category: dict[str, float] = defaultdict(float)
    for name, (ms, _) in kernels.items():
        by_category[kernel_category(name)] += ms
    return dict(kernels), dict(by_category)


def profile_kernels(fn: Callable[[], Any], calls: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """`kernel_times` of `calls` calls of `fn` under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return kernel_times(prof, calls)


def top_kernels(kernels: dict[str, list[float]], calls: int, count: int, per_call_key: str) -> list[dict]:
    """The `count` kernels of most time: name (cut to 160 characters), ms per call, launches per call (under
    `per_call_key`) and category."""
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:count]
    return [
        {"name": name[:160], "ms": ms, per_call_key: launches // calls, "category": kernel_category(name)}
        for name, (ms, launches) in top
    ]
