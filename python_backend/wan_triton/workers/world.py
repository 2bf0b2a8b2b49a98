"""Start torch.distributed in worker processes: a free local port, the process-group init, one-shot worlds."""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# How long a collective waits for a peer before failing. A dead peer is normally seen sooner: its sockets close.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(rank: int, world_size: int, port: int, backend: str, threads: int | None = None) -> None:
    """Join the process group on this host (127.0.0.1:port) as `rank`."""
    # Gloo picks its network interface from the host name, which may not resolve in a container. Set for an NCCL
    # world too: the ranks' stop agreement (wan_triton.workers.step_agreement) is a gloo group beside it.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if threads is not None:
        torch.set_num_threads(threads)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def cpu_threads_per_rank(world_size: int) -> int:
    """Share the host's cores between the ranks of a CPU (gloo) world instead of oversubscribing them."""
    return max(1, (os.cpu_count() or 1) // world_size)


def _entry(rank: int, world_size: int, port: int, backend: str, fn, args, results) -> None:
    try:
        threads = cpu_threads_per_rank(world_size) if backend == "gloo" else None
        init_distributed(rank, world_size, port, backend, threads)
        value = fn(rank, *args)
        results.put((rank, True, _serialised(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serialised(value: Any) -> bytes:
    """The value as bytes. A tensor put on the queue as it is travels as a shared-memory handle that the parent
    fetches from this process, which may have exited by then ("Connection reset by peer" in the parent)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def run_world(
    world_size: int, fn: Callable[..., Any], args: tuple = (), backend: str = "gloo", timeout_s: float = 600
) -> list[Any]:
    """Run `fn(rank, *args)` in `world_size` fresh processes of one process group; each rank's return value.

    For one-shot work (tests, benchmarks); serving uses the long-lived `group.WorkerGroup`.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(rank, world_size, port, backend, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"world of {world_size}: no result within {timeout_s} s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            values[rank] = torch.load(io.BytesIO(value), weights_only=False)  # from this function's own ranks
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [values[r] for r in range(world_size)]
