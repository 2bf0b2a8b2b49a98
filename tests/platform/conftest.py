"""Fixtures of the platform tier: the tiny model's repository built once for every replica, and HAProxy in front of
replicas (tests/replicas.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from factories import DEPLOYMENTS_DIR
from replicas import MODEL, Balancer


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """The tiny model's repository (cpu.yaml, renamed `wan_lb`), built once; every replica serves it."""
    from wan_build.__main__ import main as build_main
    from wan_triton.config.deployment import Deployment

    root = tmp_path_factory.mktemp("platform")
    deployment = Deployment.load(DEPLOYMENTS_DIR / "cpu.yaml").model_copy(update={"model_name": MODEL})
    dep_file = root / "deployment.json"
    dep_file.write_text(deployment.to_json())
    repo = root / "repo"
    args = ["--model", "tiny", "--deployment", str(dep_file), "--repo", str(repo)]
    assert build_main([*args, "--artifacts-root", str(root / "artifacts")]) == 0
    return repo


@pytest.fixture
def balancer_factory(tmp_path) -> Iterator:
    """Starts HAProxy in front of (grpc_port, http_port) replicas; stops every one it started."""
    started: list[Balancer] = []

    def start(replicas: list[tuple[int, int]]) -> Balancer:
        started.append(Balancer(tmp_path / f"haproxy{len(started)}", replicas))
        return started[-1]

    yield start
    for balancer in started:
        balancer.stop()
