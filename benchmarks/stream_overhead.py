"""What streaming costs: the same request through the unary ensemble and through the streaming endpoint, alternated.

Starts a Triton server on a rendered model repository, sends one warm-up request, then `--pairs` times a unary
request to `<model>` and the same request (same seed) to `<model>_stream`, with previews every `--preview` steps
(0: none). Records each request's latency, for the stream also when its first denoising progress arrived and how many
progress responses and previews came, checks the two answers hold the same frames, and writes JSON.

    python benchmarks/stream_overhead.py --repo /tmp/repo --model wan_t2v --height 480 --width 832 \
        --num-frames 81 --steps 4 --preview 2 --pairs 2 --out $OUT/stream_overhead.json
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from wan_bench.records import run_record, write_json
from wan_client import build_infer_inputs
from wan_triton.tritonserver.launch import running_server

PROGRESS = ("stage", "step", "num_steps", "elapsed_s", "preview_frame")


def unary(client: grpcclient.InferenceServerClient, model: str, request: dict) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    result = client.infer(
        model, build_infer_inputs(request), outputs=[grpcclient.InferRequestedOutput(o) for o in ("frames", "video")]
    )
    return time.perf_counter() - started, result.as_numpy("frames")


def streamed(url: str, model: str, request: dict) -> dict:
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    outputs = [grpcclient.InferRequestedOutput(o) for o in ("frames", "video", *PROGRESS)]
    started = time.perf_counter()
    client.async_stream_infer(f"{model}_stream", build_infer_inputs(request), outputs=outputs)
    first_step_s = None
    progress = previews = 0
    while True:
        result, error = responses.get(timeout=3600)
        if error is not None:
            client.stop_stream()
            raise RuntimeError(f"stream failed: {error}")
        stage = result.as_numpy("stage")[0].decode()
        if stage == "done":
            break
        progress += 1
        previews += result.as_numpy("preview_frame") is not None
        if first_step_s is None and stage == "denoise" and int(result.as_numpy("step")[0]) > 0:
            first_step_s = time.perf_counter() - started
    latency = time.perf_counter() - started
    client.stop_stream()
    client.close()
    return {
        "latency_s": latency,
        "first_step_s": first_step_s,
        "progress_responses": progress,
        "previews": previews,
        "frames": result.as_numpy("frames"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--model", default="wan_t2v")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--preview", type=int, default=2, help="a preview every K steps on the stream (0: none)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--log", type=Path, default=Path("/tmp/tritonserver_stream.log"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    request = dict(
        prompt="a lighthouse on a cliff at dusk, waves below",
        seed=11,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_inference_steps=args.steps,
    )
    report: dict = {
        **run_record(argv=argv),
        "request": request,
        "preview_every": args.preview,
        "pairs": [],
    }
    with running_server([args.repo], args.log, ready_timeout_s=1800) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        report["warm_up_s"], _ = unary(client, args.model, request)
        for _ in range(args.pairs):
            unary_s, frames = unary(client, args.model, request)
            stream = streamed(server.grpc_url, args.model, {**request, "preview": args.preview})
            same = bool(np.array_equal(frames, stream.pop("frames")))
            report["pairs"].append({"unary_s": unary_s, **stream, "same_frames": same})
            print(json.dumps(report["pairs"][-1]), flush=True)
            write_json(args.out, report)
    pairs = report["pairs"]
    unary_mean = statistics.mean(p["unary_s"] for p in pairs)
    stream_mean = statistics.mean(p["latency_s"] for p in pairs)
    report["summary"] = {
        "unary_mean_s": unary_mean,
        "stream_mean_s": stream_mean,
        "stream_overhead_pct": 100 * (stream_mean / unary_mean - 1),
        "all_same_frames": all(p["same_frames"] for p in pairs),
    }
    write_json(args.out, report)
    print(json.dumps(report["summary"], indent=2))
    return 0 if report["summary"]["all_same_frames"] else 1


if __name__ == "__main__":
    sys.exit(main())
