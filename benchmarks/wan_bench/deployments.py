"""Deployments as the benchmarks serve them: a copy of a deployment file with the setting under test changed
(`serving.max_batch_size`, the warm-up shapes), and the model repository rendered from it (`make build`'s
`wan_build`).

The GPU drivers write their copies through the command line:

    python -m wan_bench.deployments --deployment model_repository/deployments/gpu_a14b.yaml \
        --max-batch-size 2 --warmup 480x832x81 --out /tmp/deployment_b2.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wan_triton.config.deployment import Deployment, WarmupShape


def parse_shape(text: str) -> WarmupShape:
    """HEIGHTxWIDTHxFRAMES, e.g. 480x832x81."""
    try:
        height, width, num_frames = (int(part) for part in text.split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHTxWIDTHxFRAMES, e.g. 480x832x81") from error
    return WarmupShape(height=height, width=width, num_frames=num_frames)


def deployment_copy(
    path: Path, max_batch_size: int | None = None, warmup: list[WarmupShape] | None = None
) -> Deployment:
    """The deployment at `path` with `serving.max_batch_size` and the warm-up shapes replaced where given."""
    deployment = Deployment.load(path)
    update: dict = {}
    if max_batch_size is not None:
        update["serving"] = deployment.serving.model_copy(update={"max_batch_size": max_batch_size})
    if warmup is not None:
        update["warmup"] = warmup
    return deployment.model_copy(update=update)


def render(checkpoint: str, deployment: Path, repo: Path, artifacts_root: Path | None = None) -> Path:
    """`make build MODEL=checkpoint DEPLOYMENT=deployment REPO=repo`: export and check the graphs, render the
    model repository; returns `repo`."""
    from wan_build.__main__ import main as build_main

    argv = ["--model", checkpoint, "--deployment", str(deployment), "--repo", str(repo)]
    if artifacts_root is not None:
        argv += ["--artifacts-root", str(artifacts_root)]
    if build_main(argv) != 0:
        raise SystemExit(f"build failed: {' '.join(argv)}")
    return repo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a copy of a deployment with the setting under test changed.")
    parser.add_argument("--deployment", type=Path, required=True)
    parser.add_argument("--max-batch-size", type=int, help="serving.max_batch_size")
    parser.add_argument("--warmup", nargs="*", type=parse_shape, help="warm-up shapes HEIGHTxWIDTHxFRAMES")
    parser.add_argument("--out", type=Path, required=True, help="the copy (JSON, as `make build` reads it)")
    args = parser.parse_args(argv)
    deployment = deployment_copy(args.deployment, args.max_batch_size, args.warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(deployment.to_json())
    print(f"{args.out}: {deployment.serving}; warm-up {deployment.warmup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
