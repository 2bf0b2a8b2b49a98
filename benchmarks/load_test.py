"""Load test: many concurrent clients, mixed request shapes, and three checks on a running server.

1. No request fails.
2. Every output equals the same request served alone: each distinct request is first sent on its own, one at a
   time; under load every response's `frames` must be byte-for-byte those frames (and `used_seed` the same).
3. No memory growth: the resident memory (RSS) of the tritonserver process plus its children (the Python backend
   stubs, one per model instance) is sampled while the first `--window` requests complete and while the last
   `--window` complete; the growth of the mean from the first window to the last must stay under
   `--max-growth-pct` percent of the first.

Against `make serve` (cache off: every request runs the pipeline):

    python benchmarks/load_test.py --url localhost:8001 --clients 32 --requests 200 \
        --out benchmarks/results/throughput/load_test_cpu.json

Exits 0 only when all three checks pass.
"""

from __future__ import annotations

import argparse
import queue
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from wan_bench.records import run_record, write_json
from wan_client import build_infer_inputs

OUTPUTS = ("frames", "used_seed")
# (height, width, num_frames, num_inference_steps): within cpu.yaml's limits, from tiny to the defaults.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "64x64x5x4": (64, 64, 5, 4),
    "48x80x9x6": (48, 80, 9, 6),
    "96x64x13x8": (96, 64, 13, 8),
    "128x128x17x10": (128, 128, 17, 10),
}
PROMPTS = ("a red fox runs through fresh snow at dawn", "waves crash on a rocky shore at sunset")
SAMPLE_EVERY_S = 0.25


def distinct_requests(shapes: list[str], seeds_per_shape: int) -> list[dict]:
    requests = []
    for i, name in enumerate(shapes):
        height, width, num_frames, steps = SHAPES[name]
        for j in range(seeds_per_shape):
            requests.append(
                {
                    "prompt": PROMPTS[(i + j) % len(PROMPTS)],
                    "height": height,
                    "width": width,
                    "num_frames": num_frames,
                    "num_inference_steps": steps,
                    "seed": 1000 * i + j,
                }
            )
    return requests


def infer(client: grpcclient.InferenceServerClient, model: str, request: dict):
    return client.infer(
        model, build_infer_inputs(request), outputs=[grpcclient.InferRequestedOutput(o) for o in OUTPUTS]
    )


def server_pid_for(grpc_port: int) -> int:
    """The tritonserver process serving gRPC on this port (from its `--grpc-port=` argument)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and Path(cmdline[0]).name == "tritonserver" and f"--grpc-port={grpc_port}" in cmdline:
            return proc.info["pid"]
    raise RuntimeError(f"no tritonserver process with --grpc-port={grpc_port} on this machine; pass --server-pid")


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (tritonserver and its Python backend stubs)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class Outcome:
    index: int  # position in the load sequence
    distinct: int  # which distinct request
    started_s: float
    latency_s: float
    error: str | None = None
    identical: bool = False


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    completed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, completed so far, rss bytes)


def run_load(
    url: str,
    model: str,
    distinct: list[dict],
    references: list,
    sequence: list[int],
    clients: int,
    server_pid: int,
) -> Load:
    """Send `sequence` (indices into `distinct`) from `clients` threads; sample the server's RSS meanwhile."""
    work: queue.Queue[tuple[int, int]] = queue.Queue()
    for index, which in enumerate(sequence):
        work.put((index, which))
    load = Load()
    start = time.monotonic()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = tree_rss_bytes(server_pid)
            with load.lock:
                load.samples.append((time.monotonic() - start, load.completed, rss))
            done.wait(SAMPLE_EVERY_S)

    def client_loop() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            while True:
                try:
                    index, which = work.get_nowait()
                except queue.Empty:
                    return
                sent = time.monotonic()
                outcome = Outcome(index, which, sent - start, 0.0)
                try:
                    result = infer(client, model, distinct[which])
                    frames, seed = references[which]
                    outcome.identical = bool(
                        int(result.as_numpy("used_seed")[0]) == seed
                        and result.as_numpy("frames").tobytes() == frames.tobytes()
                        and result.as_numpy("frames").shape == frames.shape
                    )
                except InferenceServerException as error:
                    outcome.error = f"{error.status()}: {error.message()}"
                outcome.latency_s = time.monotonic() - sent
                with load.lock:
                    load.outcomes.append(outcome)
                    load.completed += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    load.samples.append((time.monotonic() - start, load.completed, tree_rss_bytes(server_pid)))
    return load


def memory_windows(load: Load, total: int, window: int) -> dict[str, float]:
    """Mean and max RSS while the first `window` and the last `window` requests completed."""
    first = [rss for _, completed, rss in load.samples if completed < window]
    last = [rss for _, completed, rss in load.samples if completed >= total - window]
    if not first or not last:
        raise RuntimeError(f"RSS not sampled in both windows ({len(first)} and {len(last)} samples)")
    mb = 1 / 2**20
    result = {
        "first_window_mean_mb": statistics.mean(first) * mb,
        "first_window_max_mb": max(first) * mb,
        "last_window_mean_mb": statistics.mean(last) * mb,
        "last_window_max_mb": max(last) * mb,
        "first_window_samples": len(first),
        "last_window_samples": len(last),
    }
    result["growth_mb"] = result["last_window_mean_mb"] - result["first_window_mean_mb"]
    result["growth_pct"] = 100 * result["growth_mb"] / result["first_window_mean_mb"]
    return result


def load_test(
    url: str,
    model: str,
    shapes: list[str],
    seeds_per_shape: int,
    clients: int,
    total: int,
    window: int,
    max_growth_pct: float,
    server_pid: int,
    order_seed: int = 0,
) -> dict:
    """The whole test: references served alone, then the load; returns the report (`passed` says if all held)."""
    distinct = distinct_requests(shapes, seeds_per_shape)
    references = []
    alone_s = []
    with grpcclient.InferenceServerClient(url) as client:
        for request in distinct:
            sent = time.monotonic()
            result = infer(client, model, request)
            alone_s.append(time.monotonic() - sent)
            references.append((result.as_numpy("frames").copy(), int(result.as_numpy("used_seed")[0])))
    # Every distinct request the same number of times (+-1), in a shuffled, reproducible order.
    sequence = [i % len(distinct) for i in range(total)]
    random.Random(order_seed).shuffle(sequence)
    started = time.monotonic()
    load = run_load(url, model, distinct, references, sequence, clients, server_pid)
    wall_s = time.monotonic() - started

    failures = [o for o in load.outcomes if o.error is not None]
    mismatches = [o for o in load.outcomes if o.error is None and not o.identical]
    memory = memory_windows(load, total, window)
    latencies = sorted(o.latency_s for o in load.outcomes if o.error is None)
    report = {
        "url": url,
        "model": model,
        "clients": clients,
        "requests": total,
        "distinct_requests": distinct,
        "alone_latency_s": alone_s,
        "wall_s": wall_s,
        "throughput_req_per_s": len(load.outcomes) / wall_s,
        "latency_s": {
            "p50": latencies[len(latencies) // 2] if latencies else None,
            "p90": latencies[int(0.9 * (len(latencies) - 1))] if latencies else None,
            "max": latencies[-1] if latencies else None,
        },
        "completed": len(load.outcomes),
        "failures": len(failures),
        "failure_messages": sorted({o.error for o in failures if o.error})[:10],
        "identical_to_alone": sum(o.identical for o in load.outcomes),
        "mismatches": len(mismatches),
        "memory_window_requests": window,
        "memory": memory,
        "max_growth_pct": max_growth_pct,
    }
    report["passed"] = (
        len(load.outcomes) == total and not failures and not mismatches and memory["growth_pct"] <= max_growth_pct
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address of a running server")
    parser.add_argument("--model", default="wan_t2v")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--seeds-per-shape", type=int, default=2)
    parser.add_argument("--window", type=int, default=50, help="requests in each memory window")
    parser.add_argument("--max-growth-pct", type=float, default=5.0, help="allowed RSS growth, first to last window")
    parser.add_argument("--server-pid", type=int, help="tritonserver's pid (default: found by its gRPC port)")
    parser.add_argument("--out", type=Path, help="JSON report")
    args = parser.parse_args(argv)
    if not 0 < args.window <= args.requests // 2:
        parser.error("--window must be in [1, requests / 2] so the two windows do not overlap")

    pid = args.server_pid or server_pid_for(int(args.url.rsplit(":", 1)[1]))
    report = load_test(
        args.url,
        args.model,
        args.shapes,
        args.seeds_per_shape,
        args.clients,
        args.requests,
        args.window,
        args.max_growth_pct,
        pid,
    )
    report = {**run_record(argv=argv), **report}
    m = report["memory"]
    print(
        f"{report['completed']}/{args.requests} requests from {args.clients} clients in {report['wall_s']:.1f} s "
        f"({report['throughput_req_per_s']:.2f} req/s); failures {report['failures']}; identical to alone "
        f"{report['identical_to_alone']}/{report['completed']}; RSS first {args.window}: "
        f"{m['first_window_mean_mb']:.0f} MB, last {args.window}: {m['last_window_mean_mb']:.0f} MB, "
        f"growth {m['growth_mb']:+.0f} MB "
        f"({m['growth_pct']:+.2f}%, limit {args.max_growth_pct}%) -> {'PASS' if report['passed'] else 'FAIL'}"
    )
    if args.out:
        write_json(args.out, report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
