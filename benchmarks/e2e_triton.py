"""End-to-end requests through a running Triton server, and where the time went.

Sends the same request N times through the gRPC client library (what the `wan_client` package uses), then reads
Triton's own per-model statistics (`compute_infer` of each ensemble step) before and after, so the breakdown is
measured by the server itself: text encode, denoise (scheduler), VAE decode, postprocess, preprocess, and the
serving overhead = client latency - the sum of the step compute times. Against `make serve`:

    python benchmarks/e2e_triton.py --url localhost:8001 --height 480 --width 832 --num-frames 81 --steps 4 \
        --requests 2 --out out/e2e.json

With `--repo` it starts its own server on a rendered model repository (`benchmarks/gpu/e2e.sh` does, on a GPU
host) and also records the device memory each stage peaked at. `--image PATH` sends the file as the `image` input of
an image-to-video model (the record shows its size).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import tritonclient.grpc as grpcclient

from wan_bench.load import add_request_arguments, described, request_of, send
from wan_bench.metrics import STEPS, device_memory, metrics_text, stats_delta, step_stats
from wan_bench.records import run_record, write_json

SEED = 7


def measure(url: str, model: str, request: dict, warmup: int, requests: int):
    """Warm up, then time `requests` requests one after another; returns the growth of each step's statistics over
    the timed requests and their latencies."""
    for outcome in send(url, model, request, [SEED] * warmup):
        if "error" in outcome:
            raise SystemExit(f"warm-up request failed: {outcome['error']}")
        print(f"warm-up request: {outcome['latency_s']:.1f} s", flush=True)
    with grpcclient.InferenceServerClient(url) as client:
        before = step_stats(client, model)
    outcomes = send(url, model, request, [SEED] * requests)
    with grpcclient.InferenceServerClient(url) as client:
        after = step_stats(client, model)
    if errors := [o["error"] for o in outcomes if "error" in o]:
        raise SystemExit(f"{len(errors)} of {requests} requests failed: {errors[0]}")
    return stats_delta(before, after), [o["latency_s"] for o in outcomes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--repo", type=Path, help="start a server on this model repository instead of using --url")
    parser.add_argument("--model", default="wan_t2v")
    add_request_arguments(parser)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    request = request_of(args, seed=SEED)
    memory: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        url = args.url
        if args.repo:
            from wan_triton.tritonserver.launch import running_server

            log = args.repo.resolve().parent / "tritonserver.log"
            server = stack.enter_context(running_server([args.repo], log, ready_timeout_s=900))
            url = server.grpc_url
        delta, latencies = measure(url, args.model, request, args.warmup, args.requests)
        if args.repo:
            memory = device_memory(metrics_text(server.metrics_port))

    per_step = {s: delta[s]["compute_ns"] / 1e9 / args.requests for s in STEPS}
    latency = statistics.mean(latencies)
    overhead = latency - sum(per_step.values())
    result = {
        **run_record(),
        "request": described(request),
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
        write_json(args.out, result)


if __name__ == "__main__":
    main()
