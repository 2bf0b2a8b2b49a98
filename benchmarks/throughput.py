"""Throughput of the served pipeline under concurrent clients, with request batching off and on.

Renders the same checkpoint and deployment twice, differing only in `serving.max_batch_size` (1 = off, and the
batch size given), starts a real Triton server on each in turn, and at each concurrency level runs that many
client threads, each sending `--requests-per-client` requests back to back (same shape, its own seeds). Reports
requests per second, mean latency, and the mean batch size the scheduler ran (from the server's `wan_batch_size`
histogram). Both servers run at once and each level is measured off, on, on, off (each pass
`--requests-per-client` requests per client), so drifting load from other jobs weighs on both settings alike.
Usage (tiny default model on CPU):

    python benchmarks/throughput.py --model tiny --deployment model_repository/deployments/cpu.yaml \
        --batch-size 8 --concurrency 1 2 4 8 --out benchmarks/results/throughput/throughput_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
for folder in ("client", "build", "python_backend"):
    sys.path.insert(0, str(ROOT / folder))
from wan_client import build_infer_inputs  # noqa: E402


def batch_histogram(metrics_port: int, model: str) -> tuple[float, float]:
    """(sum, count) of the server's `wan_batch_size` histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for kind in ("sum", "count"):
        match = re.search(rf'^wan_batch_size_{kind}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', text, re.M)
        values[kind] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def run_level(url: str, model: str, request: dict, concurrency: int, per_client: int) -> dict:
    def client_loop(index: int) -> list[float]:
        latencies = []
        with grpcclient.InferenceServerClient(url) as client:
            for n in range(per_client):
                started = time.perf_counter()
                inputs = build_infer_inputs({**request, "seed": 1000 * index + n})
                client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("video")])
                latencies.append(time.perf_counter() - started)
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [s for result in pool.map(client_loop, range(concurrency)) for s in result]
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "latency_mean_s": statistics.mean(latencies),
        "latency_max_s": max(latencies),
    }


def render(model: str, deployment_path: Path, batch_size: int, work: Path) -> Path:
    from wan_build.__main__ import main as build_main
    from wan_triton.config.deployment import Deployment, Serving

    deployment = Deployment.load(deployment_path)
    deployment = deployment.model_copy(update={"serving": Serving(max_batch_size=batch_size)})
    dep_file = work / f"deployment_b{batch_size}.json"
    dep_file.write_text(deployment.to_json())
    repo = work / f"repo_b{batch_size}"
    argv = ["--model", model, "--deployment", str(dep_file), "--repo", str(repo)]
    if build_main(argv) != 0:
        raise SystemExit(f"build failed for batch size {batch_size}")
    return repo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--deployment", type=Path, default=ROOT / "model_repository/deployments/cpu.yaml")
    parser.add_argument("--batch-size", type=int, default=8, help="max_batch_size of the batching-on run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt", default="a red fox runs through fresh snow at dawn, cinematic")
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: the deployment's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from wan_triton.config.deployment import Deployment
    from wan_triton.tritonserver.launch import running_server

    model_name = Deployment.load(args.deployment).model_name
    request = {"prompt": args.prompt}  # the deployment's default shape
    if args.steps is not None:
        request["num_inference_steps"] = args.steps
    rows = []
    load_before = os.getloadavg()  # the machine is shared: other load skews CPU figures
    with tempfile.TemporaryDirectory(prefix="wan_throughput_") as tmp, contextlib.ExitStack() as stack:
        # Both servers run side by side (an idle one costs next to nothing) and each level is measured off, on,
        # on, off, so that load which drifts during the run weighs on both settings alike.
        servers = {}
        for label, batch_size in (("off", 1), ("on", args.batch_size)):
            repo = render(args.model, args.deployment, batch_size, Path(tmp))
            log = Path(tmp) / f"tritonserver_b{batch_size}.log"
            servers[label] = (stack.enter_context(running_server([repo], log, ready_timeout_s=900)), batch_size)
        for server, _ in servers.values():
            run_level(server.grpc_url, model_name, request, 1, 1)  # warm-up
        for concurrency in args.concurrency:
            parts: dict[str, list[dict]] = {"off": [], "on": []}
            batches = {"off": [0.0, 0.0], "on": [0.0, 0.0]}
            for label in ("off", "on", "on", "off"):
                server, _ = servers[label]
                before = batch_histogram(server.metrics_port, model_name)
                parts[label].append(
                    run_level(server.grpc_url, model_name, request, concurrency, args.requests_per_client)
                )
                after = batch_histogram(server.metrics_port, model_name)
                batches[label][0] += after[0] - before[0]
                batches[label][1] += after[1] - before[1]
            for label, measured in parts.items():
                requests = sum(m["requests"] for m in measured)
                wall = sum(m["wall_s"] for m in measured)
                row = {
                    "concurrency": concurrency,
                    "batching": label,
                    "max_batch_size": servers[label][1],
                    "requests": requests,
                    "wall_s": wall,
                    "requests_per_s": requests / wall,
                    "latency_mean_s": sum(m["latency_mean_s"] * m["requests"] for m in measured) / requests,
                    "latency_max_s": max(m["latency_max_s"] for m in measured),
                    "mean_batch_size": batches[label][0] / batches[label][1] if batches[label][1] else 0.0,
                }
                rows.append(row)
                print(
                    f"batching {label:3} c={concurrency}: {row['requests_per_s']:.2f} req/s, "
                    f"latency {row['latency_mean_s']:.2f} s, mean batch {row['mean_batch_size']:.2f}",
                    flush=True,
                )
    result = {
        "commit": os.environ.get("COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "device": os.environ.get("DEVICE", f"{os.cpu_count()}-core CPU"),
        "request": request,
        "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
