r"""Throughput of the served pipeline under concurrent clients, with request batching off and on: requests per
second, latency, and the batches the scheduler ran, at several client concurrencies.

The servers, one of three ways:
- (default) `--deployment` rendered with `--checkpoint` twice, differing only in `serving.max_batch_size` (1:
  batching off, and `--max-batch-size`: on), both served at once; each concurrency level is measured off, on, on,
  off, so load that drifts during the run (other jobs on the machine) weighs on both settings alike. The tiny
  model on the CPU:

    python benchmarks/throughput.py --max-batch-size 8 --concurrency 1 2 4 8 --out out/throughput_tiny_cpu.json

- `--repo DIR`: a rendered model repository, served here; one batching setting a run (`--max-batch-size`: the
  one it was rendered with). On a GPU host, `benchmarks/gpu/throughput.sh` renders the A14B deployment and runs:

    python benchmarks/throughput.py --repo /tmp/repo_b1 --max-batch-size 1 --height 480 --width 832 \
        --num-frames 81 --steps 2 --concurrency 1 2 4 8 --out $OUT/throughput_b1.json

- `--url HOST:PORT`: a server started elsewhere (`benchmarks/gpu/throughput.sh` with DETACH=1 starts one that
  outlives the run, so that later runs measure more levels without loading the model again); this waits for it
  to be ready.

Each server is warmed up first with 1 + its max batch size concurrent requests (the batched shapes compile then,
not in a measured level). In each pass of a level, `c` client threads each send `--requests-per-client` requests
back to back (same shape, seeds of their own). Per pass: requests per second and per minute, mean / p50 / max
latency, failures, the mean batch size (the server's `wan_batch_size` histogram) and the scheduler's inferences per
execution, each step's compute and queue seconds per request (Triton's statistics; a batched execution counts
against every request in it), each stage's peak device memory (`wan_device_memory_bytes`), the whole GPU's peak
memory (nvidia-smi, where there is one), the MP4 sizes, and the CUDA-pool warnings in the server log. `rows` sums
the passes of each level and setting. The JSON is rewritten after every pass; a level that would end after
`--time-limit-s` seconds from the start (estimated from the rate measured so far) is skipped and marked so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient

from wan_bench.load import add_request_arguments, described, request_of, run_clients
from wan_bench.memory import GpuMemorySampler
from wan_bench.metrics import STEPS, batch_histogram, device_memory, metrics_text, stats_delta, step_stats
from wan_bench.records import REPO, run_record, write_json

STARTED = time.monotonic()
SEEDS = "10000 * concurrency + 100 * client + n (n-th request of that client)"

LOG_WARNINGS = {
    # Triton's CUDA memory pool (`serving.cuda_memory_pool_mib`) holds the GPU tensors that wait between ensemble
    # steps; when it runs out Triton falls back to pinned host memory, and the Python backend stub can then fail to
    # load the step's GPU inputs (triton-inference-server/server#7148, #8177: empty outputs).
    "cuda_pool_exhausted": "Failed to allocate CUDA memory",
    "stub_gpu_buffer_errors": "failed to copy data",
}


@dataclass
class ExternalServer:
    """A server started elsewhere (`--url`), as far as this benchmark needs one."""

    grpc_url: str
    http_port: int
    metrics_port: int

    def is_ready(self) -> bool:
        from wan_triton.tritonserver.launch import server_ready

        return server_ready(self.http_port)


@dataclass
class Served:
    """One server under test: its batching setting and where its log is."""

    label: str  # "off" (max_batch_size 1) or "on"
    max_batch_size: int
    server: object  # RunningServer or ExternalServer
    log: Path | None


def log_counts(log: Path | None) -> dict[str, int]:
    if log is None or not log.exists():
        return {}
    text = log.read_text(encoding="utf-8", errors="replace")
    return {key: text.count(needle) for key, needle in LOG_WARNINGS.items()}


def label_of(max_batch_size: int) -> str:
    return "off" if max_batch_size == 1 else "on"


def warm_up(served: Served, model: str, request: dict, requests: int, sampler: GpuMemorySampler) -> dict:
    """`requests` concurrent requests. With max_queue_delay 0 the first goes alone and the rest arrive while it runs
    and are batched, so the batched expert shape is compiled here rather than in a measured level."""
    outcomes, wall = run_clients(served.server.grpc_url, model, request, [[i + 1] for i in range(requests)])
    hist = batch_histogram(metrics_text(served.server.metrics_port), model)
    print(f"warm-up ({served.label}): {requests} requests in {wall:.1f} s, batches {hist}: {outcomes}", flush=True)
    return {
        "requests": requests,
        "wall_s": wall,
        "outcomes": outcomes,
        "batch_histogram_sum_count": hist,
        "gpu_memory_peak_mib": sampler.reset(),
    }


def measure_pass(
    served: Served, model: str, request: dict, concurrency: int, per_client: int, sampler: GpuMemorySampler
) -> dict:
    """One pass of a level: `concurrency` clients, `per_client` requests each, and what the server counted."""
    server = served.server
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        before = step_stats(client, model)
    hist_before = batch_histogram(metrics_text(server.metrics_port), model)
    log_before = log_counts(served.log)
    sampler.reset()
    seeds = [[10000 * concurrency + 100 * c + k for k in range(per_client)] for c in range(concurrency)]
    outcomes, wall = run_clients(server.grpc_url, model, request, seeds)
    gpu_peak = sampler.reset()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        diff = stats_delta(before, step_stats(client, model))
    text = metrics_text(server.metrics_port)
    hist_after = batch_histogram(text, model)
    latencies = [o["latency_s"] for o in outcomes if "latency_s" in o]
    errors = [o for o in outcomes if "error" in o]
    done = max(1, diff["scheduler"]["inference_count"])
    batches = hist_after[1] - hist_before[1]
    return {
        "concurrency": concurrency,
        "batching": served.label,
        "max_batch_size": served.max_batch_size,
        "requests_per_client": per_client,
        "requests": concurrency * per_client,
        "succeeded": len(latencies),
        "failed": len(errors),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "requests_per_min": 60 * len(latencies) / wall,
        "latency_mean_s": statistics.mean(latencies) if latencies else None,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_max_s": max(latencies) if latencies else None,
        "latencies_s": latencies,
        "batch_histogram_sum": hist_after[0] - hist_before[0],
        "batched_loops": batches,
        "mean_batch_size": (hist_after[0] - hist_before[0]) / batches if batches else None,
        "scheduler_inferences_per_execution": diff["scheduler"]["inference_count"]
        / max(1, diff["scheduler"]["execution_count"]),
        "stage_compute_s_per_request": {s: diff[s]["compute_ns"] / 1e9 / done for s in STEPS},
        "stage_queue_s_per_request": {s: diff[s]["queue_ns"] / 1e9 / done for s in STEPS},
        "triton_stats_delta": diff,
        "device_memory_gb_last_request": device_memory(text),
        "gpu_memory_peak_mib": gpu_peak,
        "video_bytes": [o.get("video_bytes") for o in outcomes],
        "server_log_warnings": {k: v - log_before.get(k, 0) for k, v in log_counts(served.log).items()},
        "errors": errors[:4],
    }


def summary_row(passes: list[dict]) -> dict:
    """The passes of one level and setting, together."""
    succeeded = sum(p["succeeded"] for p in passes)
    wall = sum(p["wall_s"] for p in passes)
    latencies = [s for p in passes for s in p["latencies_s"]]
    batches = sum(p["batched_loops"] for p in passes)
    return {
        "concurrency": passes[0]["concurrency"],
        "batching": passes[0]["batching"],
        "max_batch_size": passes[0]["max_batch_size"],
        "passes": len(passes),
        "requests": sum(p["requests"] for p in passes),
        "failed": sum(p["failed"] for p in passes),
        "wall_s": wall,
        "requests_per_s": succeeded / wall,
        "latency_mean_s": statistics.mean(latencies) if latencies else None,
        "latency_max_s": max(latencies) if latencies else None,
        "mean_batch_size": sum(p["batch_histogram_sum"] for p in passes) / batches if batches else None,
    }


def print_pass(level: dict) -> None:
    stages = {k: round(v, 2) for k, v in level["stage_compute_s_per_request"].items()}
    gpu = "" if level["gpu_memory_peak_mib"] is None else f", GPU peak {level['gpu_memory_peak_mib']:.0f} MiB"
    print(
        f"b={level['max_batch_size']} c={level['concurrency']}: {level['succeeded']}/{level['requests']} ok, "
        f"{level['requests_per_min']:.2f} req/min, latency mean {level['latency_mean_s'] or 0:.1f} s "
        f"p50 {level['latency_p50_s'] or 0:.1f} s, mean batch {level['mean_batch_size']}{gpu}, "
        f"stages {json.dumps(stages)}",
        flush=True,
    )
    if level["errors"]:
        print(f"errors: {level['errors'][:2]}", flush=True)


def wait_ready(server: ExternalServer, time_limit_s: float) -> bool:
    while not server.is_ready():
        if time.monotonic() - STARTED > time_limit_s:
            return False
        time.sleep(1)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_argument_group("the servers (default: render --deployment twice, batching off and on)")
    where.add_argument("--checkpoint", default="tiny", help="checkpoint to render (make build's MODEL)")
    where.add_argument("--deployment", type=Path, default=REPO / "model_repository/deployments/cpu.yaml")
    where.add_argument("--repo", type=Path, help="one rendered model repository to serve here")
    where.add_argument("--url", help="gRPC host:port of a server started elsewhere")
    where.add_argument("--http-port", type=int, default=8000, help="with --url: its HTTP port (readiness)")
    where.add_argument("--metrics-port", type=int, default=8002, help="with --url: its metrics port")
    where.add_argument("--server-started-epoch", type=float, help="with --url: when that server was started")
    where.add_argument("--log", type=Path, help="the server log (--repo: written there; --url: read for warnings)")
    parser.add_argument(
        "--max-batch-size",
        "--batch-size",
        type=int,
        help="serving.max_batch_size: of the batching-on rendering (default 8), or the one --repo/--url was "
        "rendered with (required there)",
    )
    parser.add_argument("--model", help="the deployment's model_name (default: --deployment's, or wan_t2v)")
    add_request_arguments(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--requests-per-client",
        type=int,
        nargs="+",
        help="per pass: one value for every level, or one per --concurrency value (default 4 when rendering both "
        "settings, else 2)",
    )
    parser.add_argument("--warmup", type=int, help="concurrent warm-up requests per server (default: 1 + max batch)")
    parser.add_argument("--s-per-request", type=float, default=20.0, help="time estimate before any is measured")
    parser.add_argument("--time-limit-s", type=float, default=1e9, help="skip levels that would end after this many s")
    parser.add_argument("--tag", default="", help="free text stored in the JSON (which run, which server)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.repo and args.url:
        parser.error("--repo and --url: one server at a time")
    if (args.repo or args.url) and args.max_batch_size is None:
        parser.error("--repo/--url need --max-batch-size (what the repository was rendered with)")
    if not (args.repo or args.url) and args.max_batch_size == 1:
        parser.error("--max-batch-size: the batching-on rendering needs more than 1")
    per_client = args.requests_per_client or [2 if args.repo or args.url else 4]
    if len(per_client) not in (1, len(args.concurrency)):
        parser.error("--requests-per-client: one value, or one per --concurrency value")
    args.requests_per_client = per_client * len(args.concurrency) if len(per_client) == 1 else per_client
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from wan_triton.config.deployment import Deployment
    from wan_triton.tritonserver.launch import running_server

    compare = not (args.repo or args.url)
    model = args.model or (Deployment.load(args.deployment).model_name if compare else "wan_t2v")
    request = request_of(args)
    load_before = os.getloadavg()  # other load on the machine skews CPU figures
    result: dict = {
        **run_record(argv=argv),
        "tag": args.tag,
        "request": described(request),
        "seeds": SEEDS,
        "servers": {},
        "levels": [],
        "rows": [],
    }

    def write() -> None:
        if args.out:
            write_json(args.out, result)

    with contextlib.ExitStack() as stack:
        sampler = stack.enter_context(GpuMemorySampler())
        servers: list[Served] = []
        if compare:
            from wan_bench.deployments import deployment_copy, render

            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wan_throughput_")))
            # Both servers run side by side: an idle one costs next to nothing.
            for batch_size in (1, args.max_batch_size or 8):
                dep_file = work / f"deployment_b{batch_size}.json"
                dep_file.write_text(deployment_copy(args.deployment, max_batch_size=batch_size).to_json())
                repo = render(args.checkpoint, dep_file, work / f"repo_b{batch_size}")
                log = work / f"tritonserver_b{batch_size}.log"
                started = time.monotonic()
                server = stack.enter_context(running_server([repo], log, ready_timeout_s=900))
                result["servers"][label_of(batch_size)] = {"start_to_ready_s": time.monotonic() - started}
                servers.append(Served(label_of(batch_size), batch_size, server, log))
        elif args.repo:
            log = args.log or Path("tritonserver.log")
            started = time.monotonic()
            server = stack.enter_context(running_server([args.repo], log, ready_timeout_s=900))
            result["servers"][label_of(args.max_batch_size)] = {"start_to_ready_s": time.monotonic() - started}
            servers.append(Served(label_of(args.max_batch_size), args.max_batch_size, server, log))
        else:
            server = ExternalServer(args.url, args.http_port, args.metrics_port)
            was_ready = server.is_ready()
            entry = result["servers"][label_of(args.max_batch_size)] = {}
            if not wait_ready(server, args.time_limit_s):
                entry["start_to_ready_s"] = "not ready within the time limit"
                print("server not ready within the time limit", flush=True)
                write()
                return 1
            if not was_ready and args.server_started_epoch:
                entry["start_to_ready_s"] = time.time() - args.server_started_epoch
            servers.append(Served(label_of(args.max_batch_size), args.max_batch_size, server, args.log))
        for served in servers:
            info = result["servers"][served.label]
            info.update(max_batch_size=served.max_batch_size, gpu_memory_peak_until_ready_mib=sampler.reset())
            print(f"server {served.label} ready; start to ready {info.get('start_to_ready_s')} s", flush=True)
        write()

        warm = []
        for served in servers:
            requests = args.warmup if args.warmup is not None else 1 + served.max_batch_size
            if requests:
                warmup = warm_up(served, model, request, requests, sampler)
                result["servers"][served.label]["warmup"] = warmup
                warm += [o["latency_s"] for o in warmup["outcomes"] if "latency_s" in o]
                write()

        # Requests per second, until one is measured: one request at a time is pessimistic for concurrent levels.
        rate = 1 / min(warm) if warm else 1 / args.s_per_request
        order = [servers[0], servers[1], servers[1], servers[0]] if compare else servers
        for concurrency, per_client in zip(args.concurrency, args.requests_per_client, strict=True):
            total = len(order) * concurrency * per_client
            elapsed = time.monotonic() - STARTED
            if elapsed + total / rate * 1.1 > args.time_limit_s:
                skipped = f"would not fit {args.time_limit_s} s"
                result["levels"] += [
                    {"concurrency": concurrency, "batching": s.label, "skipped": skipped} for s in order
                ]
                print(f"c={concurrency}: skipped (elapsed {elapsed:.0f} s, rate {rate:.3f} req/s)", flush=True)
                write()
                continue
            passes = []
            for served in order:
                level = measure_pass(served, model, request, concurrency, per_client, sampler)
                passes.append(level)
                result["levels"].append(level)
                write()
                print_pass(level)
                if level["succeeded"]:
                    rate = level["succeeded"] / level["wall_s"]
            for served in servers:
                row = summary_row([p for p in passes if p["batching"] == served.label])
                result["rows"].append(row)
                print(
                    f"batching {row['batching']:3} c={concurrency}: {row['requests_per_s']:.2f} req/s, "
                    f"latency {row['latency_mean_s'] or 0:.2f} s, mean batch {row['mean_batch_size']}",
                    flush=True,
                )
            write()
    result["load_average_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    result["total_s"] = time.monotonic() - STARTED
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
