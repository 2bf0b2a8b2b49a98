"""Throughput of the served pipeline on a GPU at several client concurrencies, one batching setting per run.

Starts a Triton server on an already-rendered model repository (see `benchmarks/gpu_throughput.sh`, which renders
one with the serving setting under test), warms it up, then at each concurrency `c` runs `c` gRPC client threads,
each sending `--requests-per-client` requests back to back (same shape, fixed seeds of its own). Per level it
records requests per second, mean / p50 / max latency, the mean batch size the scheduler ran (the server's
`wan_batch_size` histogram, and Triton's inference vs execution counts of the scheduler), the per-stage
compute and queue times from Triton's own statistics, and the peak GPU memory in use (nvidia-smi, sampled).
The JSON is rewritten after every level, so a run cut short still leaves the levels it finished. A level that
would not finish before `--budget-s` (estimated from the rate measured so far) is skipped and marked so. With
`--url` it measures a server started elsewhere (`gpu_throughput.sh` starts one detached, so that several calls of
a time-limited GPU host share one server load); it waits for that server to be ready within the budget.

    python benchmarks/gpu_throughput.py --repo /tmp/repo_b1 --max-batch-size 1 --height 480 --width 832 \
        --num-frames 81 --steps 2 --concurrency 1 2 4 8 --out $OUT/throughput_b1.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "client"))
from wan_client import build_infer_inputs  # noqa: E402

STEPS = ("preprocess", "text_encoder", "scheduler", "vae_decoder", "postprocess")
STARTED = time.monotonic()


def model_stats(client: grpcclient.InferenceServerClient, model: str) -> dict[str, int]:
    """Cumulative Triton statistics of one model: counts and compute / queue nanoseconds."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    inference = stats["inference_stats"]

    def ns(key: str) -> int:
        return int(inference.get(key, {}).get("ns", 0))

    return {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "compute_ns": ns("compute_input") + ns("compute_infer") + ns("compute_output"),
        "queue_ns": ns("queue"),
    }


def metrics_text(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


LOG_WARNINGS = {
    # Triton's CUDA memory pool (--cuda-memory-pool-byte-size, 64 MiB by default) holds the GPU tensors that wait
    # between ensemble steps; when it runs out Triton falls back to pinned host memory, and the Python backend stub
    # can then fail to load the step's GPU inputs (triton-inference-server/server#7148, #8177: empty outputs).
    "cuda_pool_exhausted": "Failed to allocate CUDA memory",
    "stub_gpu_buffer_errors": "failed to copy data",
}


def log_counts(log: Path | None) -> dict[str, int]:
    if log is None or not log.exists():
        return {}
    text = log.read_text(encoding="utf-8", errors="replace")
    return {key: text.count(needle) for key, needle in LOG_WARNINGS.items()}


def batch_histogram(text: str, model: str) -> tuple[float, float]:
    """(sum, count) of the server's `wan_batch_size` histogram for the deployment's model name."""
    values = {}
    for kind in ("sum", "count"):
        match = re.search(rf'^wan_batch_size_{kind}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', text, re.M)
        values[kind] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def device_memory(text: str) -> dict[str, float]:
    """Peak device memory (GB) of each step's last request, from `wan_device_memory_bytes`."""
    found = re.findall(r'^wan_device_memory_bytes\{[^}]*stage="(\w+)"[^}]*\} (\S+)$', text, re.M)
    return {stage: float(value) / 1e9 for stage, value in found}


class GpuMemorySampler:
    """Samples `nvidia-smi --query-gpu=memory.used` (MiB, whole GPU, every process) every `period_s` seconds."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.peak_mib = 0.0
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
                self.peak_mib = max(self.peak_mib, max(float(v) for v in out.split()))
            self._stop.wait(self.period_s)

    def reset(self) -> float:
        peak, self.peak_mib = self.peak_mib, 0.0
        return peak

    def __enter__(self) -> GpuMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


@dataclass
class ExternalServer:
    grpc_url: str
    http_port: int
    metrics_port: int

    def is_ready(self) -> bool:
        from wan_triton.tritonserver.launch import server_ready

        return server_ready(self.http_port)


def send(url: str, model: str, request: dict, seeds: list[int]) -> list[dict]:
    """Requests back to back from one client; each entry: seed, latency or error."""
    results = []
    with grpcclient.InferenceServerClient(url) as client:
        for seed in seeds:
            started = time.perf_counter()
            try:
                inputs = build_infer_inputs({**request, "seed": seed})
                response = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("video")])
                latency = time.perf_counter() - started
                video = response.as_numpy("video")
                # The MP4's size: an empty or constant video (inputs lost between steps) encodes far smaller.
                size = len(video.reshape(-1)[0]) if video is not None and video.dtype == object else None
                results.append({"seed": seed, "latency_s": latency, "video_bytes": size})
            except Exception as error:  # noqa: BLE001 - recorded, the level goes on
                results.append({"seed": seed, "error": str(error)[:500], "after_s": time.perf_counter() - started})
    return results


def run_clients(url: str, model: str, request: dict, seeds_per_client: list[list[int]]) -> tuple[list[dict], float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(len(seeds_per_client)) as pool:
        futures = [pool.submit(send, url, model, request, seeds) for seeds in seeds_per_client]
        results = [r for f in futures for r in f.result()]
    return results, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, help="rendered model repository to serve (or --url)")
    parser.add_argument("--url", help="gRPC host:port of a server started elsewhere, instead of --repo")
    parser.add_argument("--http-port", type=int, default=8000, help="with --url: its HTTP port (readiness)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="with --url: its metrics port")
    parser.add_argument("--server-started-epoch", type=float, help="with --url: when that server was started")
    parser.add_argument("--s-per-request", type=float, default=20.0, help="time estimate before any is measured")
    parser.add_argument("--model", default="wan_t2v", help="the deployment's model_name")
    parser.add_argument("--max-batch-size", type=int, required=True, help="serving.max_batch_size it was rendered with")
    parser.add_argument("--prompt", default="a red fox runs through fresh snow at dawn, cinematic")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--requests-per-client",
        type=int,
        nargs="+",
        default=[2],
        help="one value for every level, or one per --concurrency value",
    )
    parser.add_argument("--warmup", type=int, help="concurrent warm-up requests (default: 1 + max batch size)")
    parser.add_argument("--tag", default="", help="free text stored in the JSON (which call, which server)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip levels that would end after this many s")
    parser.add_argument("--log", type=Path, default=Path("tritonserver.log"), help="server log (written with --repo)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    per_client = args.requests_per_client * len(args.concurrency)
    per_client = per_client if len(args.requests_per_client) == 1 else args.requests_per_client

    from wan_triton.tritonserver.launch import running_server

    request = {
        "prompt": args.prompt,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_inference_steps": args.steps,
    }
    result: dict = {
        "commit": os.environ.get("COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "device": os.environ.get("DEVICE", "unknown"),
        "max_batch_size": args.max_batch_size,
        "tag": args.tag,
        "request": request,
        "seeds": "10000 * concurrency + 100 * client + n (n-th request of that client)",
        "levels": [],
    }

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    with contextlib.ExitStack() as stack:
        sampler = stack.enter_context(GpuMemorySampler())
        if args.url:
            server = ExternalServer(args.url, args.http_port, args.metrics_port)
            was_ready = server.is_ready()
            while not server.is_ready():
                if time.monotonic() - STARTED > args.budget_s:
                    result["server"] = "not ready within the budget"
                    print("server not ready within the budget", flush=True)
                    write()
                    return
                time.sleep(1)
            if not was_ready and args.server_started_epoch:
                result["server_start_to_ready_s"] = time.time() - args.server_started_epoch
        else:
            load_started = time.monotonic()
            server = stack.enter_context(running_server([args.repo], args.log, ready_timeout_s=900))
            result["server_start_to_ready_s"] = time.monotonic() - load_started
        result["gpu_memory_peak_until_ready_mib"] = sampler.reset()
        print(f"server ready; start to ready {result.get('server_start_to_ready_s')} s", flush=True)
        write()

        warmup = args.warmup if args.warmup is not None else 1 + args.max_batch_size
        if warmup:
            # With max_queue_delay 0 the first request goes alone; the rest arrive while it runs and are batched,
            # so the batched expert shape is compiled here rather than in a measured level.
            outcomes, wall = run_clients(server.grpc_url, args.model, request, [[i + 1] for i in range(warmup)])
            hist = batch_histogram(metrics_text(server.metrics_port), args.model)
            result["warmup"] = {
                "requests": warmup,
                "wall_s": wall,
                "outcomes": outcomes,
                "batch_histogram_sum_count": hist,
                "gpu_memory_peak_mib": sampler.reset(),
            }
            print(f"warm-up: {warmup} requests in {wall:.1f} s, batches {hist}: {outcomes}", flush=True)
            write()

        rate = 1 / args.s_per_request  # requests per second, until one is measured
        warm = [o["latency_s"] for o in result.get("warmup", {}).get("outcomes", []) if "latency_s" in o]
        if warm:
            rate = 1 / min(warm)  # one request at a time: pessimistic for concurrent levels
        for concurrency, n in zip(args.concurrency, per_client, strict=True):
            total = concurrency * n
            elapsed = time.monotonic() - STARTED
            if elapsed + total / rate * 1.1 > args.budget_s:
                result["levels"].append({"concurrency": concurrency, "skipped": f"would not fit {args.budget_s} s"})
                print(f"c={concurrency}: skipped (elapsed {elapsed:.0f} s, rate {rate:.3f} req/s)", flush=True)
                write()
                continue
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                before = {s: model_stats(client, f"{args.model}_{s}") for s in STEPS}
            hist_before = batch_histogram(metrics_text(server.metrics_port), args.model)
            log_before = log_counts(args.log)
            sampler.reset()
            seeds = [[10000 * concurrency + 100 * c + k for k in range(n)] for c in range(concurrency)]
            outcomes, wall = run_clients(server.grpc_url, args.model, request, seeds)
            gpu_peak = sampler.reset()
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                after = {s: model_stats(client, f"{args.model}_{s}") for s in STEPS}
            text = metrics_text(server.metrics_port)
            hist_after = batch_histogram(text, args.model)
            latencies = [o["latency_s"] for o in outcomes if "latency_s" in o]
            errors = [o for o in outcomes if "error" in o]
            diff = {s: {k: after[s][k] - before[s][k] for k in after[s]} for s in STEPS}
            done = max(1, diff["scheduler"]["inference_count"])
            batches = hist_after[1] - hist_before[1]
            level = {
                "concurrency": concurrency,
                "requests_per_client": n,
                "requests": total,
                "succeeded": len(latencies),
                "failed": len(errors),
                "wall_s": wall,
                "requests_per_s": len(latencies) / wall,
                "requests_per_min": 60 * len(latencies) / wall,
                "latency_mean_s": statistics.mean(latencies) if latencies else None,
                "latency_p50_s": statistics.median(latencies) if latencies else None,
                "latency_max_s": max(latencies) if latencies else None,
                "latencies_s": latencies,
                "mean_batch_size": (hist_after[0] - hist_before[0]) / batches if batches else None,
                "batched_loops": batches,
                "scheduler_inferences_per_execution": diff["scheduler"]["inference_count"]
                / max(1, diff["scheduler"]["execution_count"]),
                # Triton counts a batched execution's whole time against every request in it.
                "stage_compute_s_per_request": {s: diff[s]["compute_ns"] / 1e9 / done for s in STEPS},
                "stage_queue_s_per_request": {s: diff[s]["queue_ns"] / 1e9 / done for s in STEPS},
                "triton_stats_delta": diff,
                "device_memory_gb_last_request": device_memory(text),
                "gpu_memory_peak_mib": gpu_peak,
                "video_bytes": [o.get("video_bytes") for o in outcomes],
                "server_log_warnings": {k: v - log_before.get(k, 0) for k, v in log_counts(args.log).items()},
                "errors": errors[:4],
            }
            result["levels"].append(level)
            write()
            if latencies:
                rate = len(latencies) / wall
            print(
                f"b={args.max_batch_size} c={concurrency}: {len(latencies)}/{total} ok, "
                f"{level['requests_per_min']:.2f} req/min, "
                f"latency mean {level['latency_mean_s'] or 0:.1f} s p50 {level['latency_p50_s'] or 0:.1f} s, "
                f"mean batch {level['mean_batch_size']}, GPU peak {gpu_peak:.0f} MiB, "
                f"stages {json.dumps({k: round(v, 2) for k, v in level['stage_compute_s_per_request'].items()})}",
                flush=True,
            )
            if errors:
                print(f"errors: {errors[:2]}", flush=True)
    result["total_s"] = time.monotonic() - STARTED
    write()


if __name__ == "__main__":
    main()
