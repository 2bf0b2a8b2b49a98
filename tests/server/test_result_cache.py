"""The result cache through the real server: an identical request (same inputs and seed) is answered by Triton's
response cache without running the pipeline, every client gets the outputs it asked for, and a request without a
seed (a fresh random video) is refused rather than answered from the cache. Its settings and rendering:
tests/unit/test_result_cache_settings.py.

These tests use the session server's `wan_cached` rendering (tests/served.py): cpu.yaml with `result_cache_bytes`
set, serving the same checkpoint as the cache-off `wan_onnx`.
"""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from served import CACHED_BYTES, CACHED_MODEL, IMAGE_CACHE_BYTES, infer
from wan_build.render import CACHED_PIPELINE

REQUEST = dict(prompt="a lighthouse in a storm", height=32, width=48, num_frames=5, num_inference_steps=2, seed=77)


def _cache_counts(server, model: str) -> tuple[float, float]:
    """(hits, misses) of one model from Triton's `nv_cache_num_{hits,misses}_per_model` metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = []
    for kind in ("hits", "misses"):
        found = re.findall(rf'^nv_cache_num_{kind}_per_model\{{model="{model}",version="1"\}} (\S+)$', text, re.M)
        counts.append(float(found[0]) if found else 0.0)
    return counts[0], counts[1]


def _executions(client, model: str) -> int:
    """How many times Triton ran a model (its `execution_count`): a cache hit does not run the pipeline."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("execution_count", 0))


def test_identical_request_is_answered_from_the_cache(server, client):
    pipeline = f"{CACHED_MODEL}_{CACHED_PIPELINE}"
    scheduler = f"{CACHED_MODEL}_scheduler"
    hits0, misses0 = _cache_counts(server, pipeline)
    runs0 = _executions(client, scheduler)
    # The first asks for the video alone; the cached entry still holds every output.
    first = infer(client, CACHED_MODEL, REQUEST, outputs=("video",))
    assert first.as_numpy("frames") is None
    assert _cache_counts(server, pipeline) == (hits0, misses0 + 1)
    assert _executions(client, scheduler) == runs0 + 1
    # Identical inputs and seed: a hit, the pipeline does not run, and the frames asked for now are there.
    second = infer(client, CACHED_MODEL, REQUEST)
    assert _cache_counts(server, pipeline) == (hits0 + 1, misses0 + 1)
    assert _executions(client, scheduler) == runs0 + 1
    assert second.as_numpy("video")[0] == first.as_numpy("video")[0]
    assert int(second.as_numpy("used_seed")[0]) == REQUEST["seed"]
    # ...and they are the frames the cache-off rendering of the same checkpoint computes.
    uncached = infer(client, "wan_onnx", REQUEST)
    np.testing.assert_array_equal(second.as_numpy("frames"), uncached.as_numpy("frames"))
    # A different seed is a different request: a miss, computed, different frames.
    other = infer(client, CACHED_MODEL, {**REQUEST, "seed": REQUEST["seed"] + 1})
    assert _cache_counts(server, pipeline) == (hits0 + 1, misses0 + 2)
    assert _executions(client, scheduler) == runs0 + 2
    assert not np.array_equal(other.as_numpy("frames"), second.as_numpy("frames"))


def test_request_without_seed_is_refused_and_never_cached(server, client):
    pipeline = f"{CACHED_MODEL}_{CACHED_PIPELINE}"
    hits0, _ = _cache_counts(server, pipeline)
    no_seed = {k: v for k, v in REQUEST.items() if k != "seed"}
    for _ in range(2):
        with pytest.raises(InferenceServerException) as info:
            infer(client, CACHED_MODEL, no_seed)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
        assert "seed: is required while the server's result cache is on" in info.value.message()
    assert _cache_counts(server, pipeline)[0] == hits0
    # The cache-off rendering keeps the contract: no seed draws a fresh one each time.
    seeds = {int(infer(client, "wan_onnx", no_seed, outputs=("used_seed",)).as_numpy("used_seed")[0]) for _ in "ab"}
    assert len(seeds) == 2


def test_cache_off_models_are_not_cached(server, client):
    scheduler = "wan_onnx_scheduler"
    runs0 = _executions(client, scheduler)
    for _ in range(2):
        # The video needs the scheduler (an ensemble skips the steps no requested output depends on).
        infer(client, "wan_onnx", REQUEST, outputs=("video",))
    assert _executions(client, scheduler) == runs0 + 2
    assert _cache_counts(server, "wan_onnx") == (0.0, 0.0)


def test_server_started_with_the_rendered_cache_size(server):
    # Triton logs the cache it created: `Creating TritonCache with name: 'local', ... cache_config: '{"size":"N"}'`.
    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    # One cache per server: the sizes of the served repositories with the cache on add up.
    total = CACHED_BYTES + IMAGE_CACHE_BYTES
    assert re.search(rf"Creating TritonCache with name: 'local'.*size\W+{total}\b", log), log[:3000]
