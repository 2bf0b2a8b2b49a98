"""Shared test setup: the test tiers as markers, tiny checkpoints unlike the default, and one real Triton server
per test session.

The tiers are the folders below tests/; every test is marked with its folder's name, so `-m` selects by tier too:

    unit/          pure logic, in-process, fast (`make test-fast`, which leaves out the `slow` ONNX exports)
    multiprocess/  gloo worker groups of several processes on CPU
    server/        against the real Triton server (the `server` fixture below)
    gpu/           CUDA only; skipped without a CUDA device
    bench/         the benchmark scripts and tools
    platform/      around the server: replicas behind HAProxy, stopping a server, and the shipped Prometheus, Grafana
                   and Kubernetes files, each checked with the real tool

A test that uses the `server` fixture is also marked `server`, whatever its folder. Helpers that tests import live
in modules beside this file (factories, checks, served, fakes), not here; pytest puts this folder on the import
path (`pythonpath` in pyproject.toml), and the project's packages come from its install (`make setup`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checks import assert_no_crash_in_log
from factories import OTHER_I2V, OTHER_TI2V, build_repository
from served import (
    CACHED_BYTES,
    CACHED_MODEL,
    DEPLOYMENTS,
    ENCODE_WHILE_DECODING,
    IMAGE_CACHE_BYTES,
    IMAGE_LIMITS,
    IMAGE_MODEL,
    IMAGE_SERVING,
    PARALLEL_DEPLOYMENT,
    PARALLEL_MODEL,
    SERVING,
    TEST_EXIT_TIMEOUT_S,
)

_TESTS = Path(__file__).resolve().parent

TIERS = {
    "unit": "pure logic, in-process and fast (tests/unit)",
    "multiprocess": "runs gloo worker groups of several processes (tests/multiprocess)",
    "server": "starts the real Triton server (tests/server, and any test using the `server` fixture)",
    "gpu": "needs a CUDA device; skipped without one (tests/gpu)",
    "bench": "checks a benchmark script or tool (tests/bench)",
    "platform": "around the server: replicas, balancer, stopping, Prometheus, Grafana, Kubernetes (tests/platform)",
}


def pytest_configure(config):
    for name, description in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    config.addinivalue_line("markers", "slow: in-process but too slow for `make test-fast` (the ONNX exports)")
    config.addinivalue_line(
        "markers", "replicas: starts Triton replicas of its own (tests/platform); `make test` runs these apart"
    )
    config.addinivalue_line(
        "markers",
        "beside_session_server: starts a small server of its module's own, which `make test` runs beside the "
        "session's server (in the process of the tests that start none)",
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    for item in items:
        path = Path(item.path)
        tier = path.relative_to(_TESTS).parts[0] if path.is_relative_to(_TESTS) else None
        if tier in TIERS:
            item.add_marker(tier)
        if "server" in item.fixturenames and tier != "server":
            item.add_marker("server")
        if "tiny_repo" in item.fixturenames:
            item.add_marker("replicas")
        if tier == "gpu":
            item.add_marker(no_cuda)
    # Each module's own server before the session's, which lives until the end: never two servers at once.
    items.sort(key=lambda item: "server" in item.fixturenames)


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

# Enough heads (4) and FFN width (64) for every parallel plan up to ulysses x tp = 4 (tests of wan_triton.parallel);
# otherwise OTHER_TINY's sizes, with smaller text and denoiser depths.
TINY4 = {
    **OTHER_TINY,
    **dict(num_layers=2, num_attention_heads=4, ffn_dim=64, text_layers=1, text_heads=2, text_ff=32, seed=21),
}


@pytest.fixture(scope="session")
def i2v_checkpoint(tmp_path_factory) -> Path:
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt_i2v") / "tiny_i2v_other", TinyConfig(**OTHER_I2V))


@pytest.fixture(scope="session")
def ti2v_checkpoint(tmp_path_factory) -> Path:
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt_ti2v") / "tiny_ti2v_other", TinyConfig(**OTHER_TI2V))


@pytest.fixture(scope="session")
def tiny4_checkpoint(tmp_path_factory) -> Path:
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt4") / "tiny4", TinyConfig(**TINY4))


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory) -> Path:
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_other", TinyConfig(**OTHER_TINY))


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory) -> Path:
    """The `--artifacts-root` of the servers' builds: a checkpoint's graphs exported for one server (the LoRA
    server's text encoder and VAE, say) are reused by the next, the export cache checking they still match."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def server(other_checkpoint, tiny4_checkpoint, ti2v_checkpoint, artifacts_root, tmp_path_factory):
    """One tritonserver for the whole test session, serving the models of tests/served.py."""
    from wan_triton.config.deployment import Deployment, Serving, Video
    from wan_triton.tritonserver.launch import running_server

    root = tmp_path_factory.mktemp("served")
    repos = []

    def video(path: Path, encode_while_decoding: bool) -> Video:
        return Deployment.load(path).video.model_copy(update={"encode_while_decoding": encode_while_decoding})

    renderings = [
        (
            name,
            path,
            other_checkpoint,
            {"serving": Serving(**SERVING[name]), "video": video(path, ENCODE_WHILE_DECODING[name])},
        )
        for name, path in DEPLOYMENTS.items()
    ]
    renderings.append((CACHED_MODEL, DEPLOYMENTS["wan_onnx"], other_checkpoint, {"result_cache_bytes": CACHED_BYTES}))
    renderings.append((PARALLEL_MODEL, PARALLEL_DEPLOYMENT, tiny4_checkpoint, {}))
    image_deployment = Deployment.load(DEPLOYMENTS["wan_torch"])
    renderings.append(
        (
            IMAGE_MODEL,
            DEPLOYMENTS["wan_torch"],
            ti2v_checkpoint,
            {
                "serving": Serving(**IMAGE_SERVING),
                "result_cache_bytes": IMAGE_CACHE_BYTES,
                "limits": image_deployment.limits.model_copy(update=IMAGE_LIMITS),
                "video": video(DEPLOYMENTS["wan_torch"], ENCODE_WHILE_DECODING["wan_torch"]),
            },
        )
    )
    for name, path, checkpoint, changes in renderings:
        deployment = Deployment.load(path).model_copy(update={"model_name": name, **changes})
        repos.append(build_repository(checkpoint, deployment, root, artifacts_root))
    with running_server(
        repos, root / "tritonserver.log", ready_timeout_s=600, exit_timeout_s=TEST_EXIT_TIMEOUT_S
    ) as running:
        yield running
    assert running.process.returncode == 0, running.shutdown_report()
    assert_no_crash_in_log(running.log_path)
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
