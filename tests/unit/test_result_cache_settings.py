"""The result cache's settings, rendering and server command, without a server: off by default, the size validated,
a cached inner ensemble rendered when on, the server started with the repositories' total, and the seed required
while it is on. tests/server/test_result_cache.py checks the cache through the server."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from factories import DEPLOYMENTS_DIR, load_deployment
from wan_build.render import CACHED_PIPELINE, render_repository
from wan_triton.config.deployment import Deployment
from wan_triton.config.request import InvalidRequestError, validate_request
from wan_triton.tritonserver import server as triton_server


def _deployment(**changes) -> Deployment:
    return Deployment.model_validate({**load_deployment("cpu_torch").model_dump(), **changes})


def test_off_by_default_in_every_shipped_deployment():
    for path in DEPLOYMENTS_DIR.glob("*.yaml"):
        assert Deployment.load(path).result_cache_bytes == 0, path


@pytest.mark.parametrize("size", [-1, 1, 1023, (1 << 20) - 1])
def test_cache_size_is_validated(size):
    with pytest.raises(ValidationError, match="result_cache_bytes"):
        _deployment(result_cache_bytes=size)


def test_cache_off_renders_one_ensemble_without_cache(tmp_path):
    repo = render_repository(_deployment(), tmp_path, tmp_path, tmp_path / "repo")
    assert not (repo / f"wan_t2v_{CACHED_PIPELINE}").exists()
    config = (repo / "wan_t2v/config.pbtxt").read_text()
    assert "response_cache" not in config and 'model_name: "wan_t2v_preprocess"' in config
    assert triton_server.result_cache_bytes([repo]) == 0
    assert not any(arg.startswith("--cache") for arg in triton_server.server_command([repo], 1, 2, 3))


def test_cache_on_renders_a_cached_inner_ensemble(tmp_path):
    repo = render_repository(_deployment(result_cache_bytes=8 << 20), tmp_path, tmp_path, tmp_path / "repo")
    outer = (repo / "wan_t2v/config.pbtxt").read_text()
    inner = (repo / f"wan_t2v_{CACHED_PIPELINE}/config.pbtxt").read_text()
    # The client-facing ensemble has no cache and one step: the cached pipeline, asked for every output.
    assert "response_cache" not in outer
    assert re.findall(r'model_name: "(\w+)"', outer) == [f"wan_t2v_{CACHED_PIPELINE}"]
    for name in ("video", "frames", "used_seed"):
        assert f'output_map {{ key: "{name}" value: "{name}" }}' in outer
    assert "response_cache { enable: true }" in inner and 'model_name: "wan_t2v_scheduler"' in inner
    # Both keep the request contract: seed stays an optional input (preprocess enforces it, see below).
    for config in (outer, inner):
        assert re.search(r'name: "seed"\s+data_type: TYPE_INT64\s+dims: \[ 1 \]\s+optional: true', config)


def test_server_command_enables_the_cache_from_the_repositories(tmp_path):
    a = render_repository(_deployment(result_cache_bytes=8 << 20), tmp_path, tmp_path, tmp_path / "a")
    other = _deployment(model_name="other", result_cache_bytes=2 << 20)
    b = render_repository(other, tmp_path, tmp_path, tmp_path / "b")
    c = render_repository(_deployment(model_name="plain"), tmp_path, tmp_path, tmp_path / "c")
    total = triton_server.result_cache_bytes([a, b, c])
    assert total == 10 << 20
    cmd = triton_server.server_command([a, b, c], 1, 2, 3, cache_bytes=total)
    assert f"--cache-config=local,size={10 << 20}" in cmd
    directory = next(arg.split("=", 1)[1] for arg in cmd if arg.startswith("--cache-directory="))
    assert (Path(directory) / "local" / "libtritoncache_local.so").is_file()


def test_seed_is_required_only_with_the_cache_on():
    inputs = {"prompt": np.array([b"a fox"], dtype=object)}
    assert validate_request(inputs, _deployment(), 16, 4).seed >= 0
    with pytest.raises(InvalidRequestError, match="seed: is required while the server's result cache is on"):
        validate_request(inputs, _deployment(result_cache_bytes=8 << 20), 16, 4)
    given = validate_request({**inputs, "seed": np.array([5])}, _deployment(result_cache_bytes=8 << 20), 16, 4)
    assert given.seed == 5
