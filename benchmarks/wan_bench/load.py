"""Requests to a running server from gRPC clients: one client's requests back to back, or several clients at once."""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tritonclient.grpc as grpcclient

from wan_client import build_infer_inputs, read_image_file

DEFAULT_PROMPT = "a red fox runs through fresh snow at dawn, cinematic"


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """--prompt, --height, --width, --num-frames, --steps, --image: the request a benchmark sends; what is left out
    takes the deployment's default."""
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--height", type=int, help="default: the deployment's")
    parser.add_argument("--width", type=int, help="default: the deployment's")
    parser.add_argument("--num-frames", type=int, help="default: the deployment's")
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: the deployment's)")
    parser.add_argument("--image", type=Path, help="image-to-video: a PNG, JPEG or WebP file sent as `image`")


def request_of(args: argparse.Namespace, **inputs: object) -> dict:
    """The model inputs of `add_request_arguments`' options that were given, and `inputs`."""
    request = {
        "prompt": args.prompt,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_inference_steps": args.steps,
        "image": read_image_file(args.image) if getattr(args, "image", None) is not None else None,
        **inputs,
    }
    return {key: value for key, value in request.items() if value is not None}


def described(request: dict) -> dict:
    """`request` as a result record shows it: the image's bytes as their count."""
    return {key: f"<{len(value)} bytes>" if isinstance(value, bytes) else value for key, value in request.items()}


def send(url: str, model: str, request: dict, seeds: list[int]) -> list[dict]:
    """`request` once per seed, back to back from one client; each outcome: the seed, and its latency and MP4 size
    or its error (recorded, not raised)."""
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
            except Exception as error:  # noqa: BLE001 - recorded; the caller counts the failures
                results.append({"seed": seed, "error": str(error)[:500], "after_s": time.perf_counter() - started})
    return results


def run_clients(url: str, model: str, request: dict, seeds_per_client: list[list[int]]) -> tuple[list[dict], float]:
    """One client thread per list of seeds, all at once: (every outcome of `send`, wall seconds until the last)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(seeds_per_client)) as pool:
        futures = [pool.submit(send, url, model, request, seeds) for seeds in seeds_per_client]
        results = [r for f in futures for r in f.result()]
    return results, time.perf_counter() - started
