"""End-to-end requests through a running Triton server, and where the time went.

Sends the same request N times through the gRPC client library (what `client/wan_client.py` uses), then reads
Triton's own per-model statistics (`compute_infer` of each ensemble step) before and after, so the breakdown is
measured by the server itself: text encode, denoise (scheduler), VAE decode, postprocess, preprocess, and the
serving overhead = client latency - the sum of the step compute times. Usage, against `make serve`:

    python benchmarks/e2e_triton.py --url localhost:8001 --height 480 --width 832 --num-frames 81 --steps 4 \
        --requests 2 --out results/e2e.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
from wan_client import build_infer_inputs  # noqa: E402

STEPS = ("preprocess", "text_encoder", "scheduler", "vae_decoder", "postprocess")


def compute_ns(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """(requests counted, total compute_input + compute_infer + compute_output ns) of one model."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    inference = stats["inference_stats"]
    total = sum(int(inference[k].get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output"))
    return int(stats.get("inference_count", 0)), total


def device_memory(metrics_port: int) -> dict[str, float]:
    """Peak device memory per stage of the last request, from the server's `wan_device_memory_bytes`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'^wan_device_memory_bytes\{[^}]*stage="(\w+)"[^}]*\} (\S+)$', text, re.M)
    return {stage: float(value) / 1e9 for stage, value in found}


def measure(url: str, model: str, request: dict, warmup: int, requests: int):
    """Warm up, then time `requests` requests; returns per-model statistics before/after and the latencies."""
    with grpcclient.InferenceServerClient(url) as client:
        outputs = [grpcclient.InferRequestedOutput("video")]
        for _ in range(warmup):
            started = time.perf_counter()
            client.infer(model, build_infer_inputs(request), outputs=outputs)
            print(f"warm-up request: {time.perf_counter() - started:.1f} s", flush=True)
        before = {s: compute_ns(client, f"{model}_{s}") for s in STEPS}
        latencies = []
        for _ in range(requests):
            started = time.perf_counter()
            client.infer(model, build_infer_inputs(request), outputs=outputs)
            latencies.append(time.perf_counter() - started)
        after = {s: compute_ns(client, f"{model}_{s}") for s in STEPS}
    return before, after, latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--repo", type=Path, help="start a server on this model repository instead of using --url")
    parser.add_argument("--model", default="wan_t2v")
    parser.add_argument("--prompt", default="a red fox runs through fresh snow at dawn, cinematic")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    request = {
        "prompt": args.prompt,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_inference_steps": args.steps,
        "seed": 7,
    }
    memory: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        url = args.url
        if args.repo:
            from wan_triton.tritonserver.launch import running_server

            log = args.repo.resolve().parent / "tritonserver.log"
            server = stack.enter_context(running_server([args.repo], log, ready_timeout_s=900))
            url = server.grpc_url
        before, after, latencies = measure(url, args.model, request, args.warmup, args.requests)
        if args.repo:
            memory = device_memory(server.metrics_port)

    per_step = {s: (after[s][1] - before[s][1]) / 1e9 / args.requests for s in STEPS}
    latency = statistics.mean(latencies)
    overhead = latency - sum(per_step.values())
    result = {
        "commit": os.environ.get("COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "request": request,
        "requests": args.requests,
        "latency_s": latency,
        "latencies_s": latencies,
        "steps_s": per_step,
        "serving_overhead_s": overhead,
        "serving_overhead_pct": 100 * overhead / latency,
        "device_memory_gb": memory,
    }
    print(f"{'stage':14} {'seconds':>9} {'share':>7}")
    for stage, seconds in per_step.items():
        print(f"{stage:14} {seconds:9.3f} {100 * seconds / latency:6.1f}%")
    print(f"{'overhead':14} {overhead:9.3f} {100 * overhead / latency:6.1f}%")
    print(f"{'end to end':14} {latency:9.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
