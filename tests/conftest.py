"""Shared test setup: a tiny checkpoint unlike the default, the diffusers reference, the parity tolerance, and one
real Triton server per test session. The packages (wan_triton, wan_build, wan_bench, wan_client) come from the
project's install (`make setup`: pip install -e)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_triton.config.request import GenerationRequest

# The GPU tests' request (tests/test_gpu*.py): 64x96 pixels, 9 frames, crossing the expert switch in 8 steps;
# 3 latent frames x 4 x 6 = 72 tokens, which split over 2 Ulysses ranks.
GPU_REQUEST = GenerationRequest(
    prompt="-",
    negative_prompt="-",
    height=64,
    width=96,
    num_frames=9,
    num_inference_steps=8,
    seed=3,
    guidance_scale=4.0,
    guidance_scale_2=3.0,
    fps=16,
)

# A tiny model whose config differs from the embedded default in every size the loader must read: layer count,
# widths, head count, vocabulary, text width and flow shift. Tests that serve it prove nothing is hard-coded.
OTHER_TINY = dict(
    num_layers=3,
    num_attention_heads=3,
    attention_head_dim=8,
    ffn_dim=40,
    text_dim=24,
    text_layers=3,
    text_heads=3,
    text_ff=48,
    vocab_pieces=300,
    vae_base_dim=6,
    flow_shift=5.0,
    seed=11,
)


# Enough heads (4) and FFN width (64) for every parallel plan up to ulysses x tp = 4 (tests of wan_triton.parallel).
TINY4 = dict(
    num_layers=2,
    num_attention_heads=4,
    attention_head_dim=8,
    ffn_dim=64,
    text_dim=24,
    text_layers=1,
    text_heads=2,
    text_ff=32,
    vocab_pieces=300,
    vae_base_dim=6,
    flow_shift=5.0,
    seed=21,
)


@pytest.fixture(scope="session")
def tiny4_checkpoint(tmp_path_factory) -> Path:
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt4") / "tiny4", TinyConfig(**TINY4))


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory) -> Path:
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_other", TinyConfig(**OTHER_TINY))


def reference_frames(checkpoint: Path, **call) -> np.ndarray:
    """diffusers' WanPipeline on the same weights, output_type="np", as uint8 frames [F, H, W, 3]."""
    from diffusers import WanPipeline

    seed = call.pop("seed")
    pipe = WanPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call).frames[0]
    return (out * 255).round().astype(np.uint8)


def assert_frames_close(ours: np.ndarray, ref: np.ndarray, max_levels: int = 2, mean_levels: float = 0.5) -> None:
    """The parity tolerance: at most `max_levels` uint8 levels apart anywhere, `mean_levels` on average."""
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= max_levels and diff.mean() <= mean_levels, (int(diff.max()), float(diff.mean()))


REPO_ROOT = Path(__file__).resolve().parent.parent
# The session's server serves both renderings of the non-default tiny checkpoint under these model names.
DEPLOYMENTS = {
    "wan_onnx": REPO_ROOT / "model_repository/deployments/cpu.yaml",
    "wan_torch": REPO_ROOT / "model_repository/deployments/cpu_torch.yaml",
}
# Queue and batching settings of each rendering (tests/test_queue_batching.py): `wan_onnx` batches up to 8
# same-shape requests; `wan_torch` runs one at a time with one waiting, so a third concurrent request is refused.
SERVING = {
    "wan_onnx": {"max_batch_size": 8, "max_queue_size": 16},
    "wan_torch": {"max_batch_size": 1, "max_queue_size": 1},
}

# Also served: a parallel plan (a worker group of 2 gloo processes, tp 2) of the 4-head checkpoint `tiny4`.
PARALLEL_MODEL = "wan_parallel"
PARALLEL_DEPLOYMENT = REPO_ROOT / "model_repository/deployments/cpu_parallel.yaml"


def logged_stops(log: str) -> list[int]:
    """The steps after which a worker group's ranks stopped a request, from the supervisor's log lines
    (wan_triton.workers.supervisor: "... the ranks stopped the request after step N")."""
    return [int(step) for step in re.findall(r"the ranks stopped the request after step (\d+)", log)]


# A third rendering with the result cache on (tests/test_result_cache.py): cpu.yaml plus result_cache_bytes.
CACHED_MODEL = "wan_cached"
CACHED_BYTES = 64 << 20


@pytest.fixture(scope="session")
def server(other_checkpoint, tiny4_checkpoint, tmp_path_factory):
    from wan_build.__main__ import main as build_main
    from wan_triton.config.deployment import Deployment, Serving
    from wan_triton.tritonserver.launch import running_server

    root = tmp_path_factory.mktemp("served")
    repos = []
    renderings = [
        (name, path, other_checkpoint, {"serving": Serving(**SERVING[name])}) for name, path in DEPLOYMENTS.items()
    ]
    renderings.append((CACHED_MODEL, DEPLOYMENTS["wan_onnx"], other_checkpoint, {"result_cache_bytes": CACHED_BYTES}))
    renderings.append((PARALLEL_MODEL, PARALLEL_DEPLOYMENT, tiny4_checkpoint, {}))
    for name, path, checkpoint, changes in renderings:
        deployment = Deployment.load(path).model_copy(update={"model_name": name, **changes})
        dep_file = root / f"{name}.json"
        dep_file.write_text(deployment.to_json())
        repo = root / f"repo_{name}"
        assert (
            build_main(
                [
                    "--model",
                    str(checkpoint),
                    "--deployment",
                    str(dep_file),
                    "--repo",
                    str(repo),
                    "--artifacts-root",
                    str(root / "artifacts"),
                ]
            )
            == 0
        )
        repos.append(repo)
    with running_server(repos, root / "tritonserver.log", ready_timeout_s=600) as running:
        yield running
    assert running.process.returncode == 0, running.shutdown_report()
    # Worker groups release what they share with their processes when they close (e.g. their stop flag's semaphores).
    log = running.log_path.read_text(encoding="utf-8", errors="replace")
    assert "resource_tracker" not in log, running.log_tail(20)


@pytest.fixture(autouse=True)
def _session_server_alive(request):
    """A test that needs the session's server fails at once, saying so, when an earlier test left it dead: the
    first failure is then the one that matters, not a screen of connection errors."""
    if "server" in request.fixturenames:
        running = request.getfixturevalue("server")
        if running.process.poll() is not None:
            pytest.fail(
                f"the session's tritonserver died before this test (exit {running.process.returncode}); "
                f"its log ends:\n{running.log_tail(30)}",
                pytrace=False,
            )
