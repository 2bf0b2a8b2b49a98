"""The perf_analyzer harness (benchmarks/perf_analyzer.py) against the session's real server, at a tiny size, so it
cannot rot: Triton's perf_analyzer runs at concurrency 1 and 2, its CSV becomes a table of real, positive numbers,
and a run whose requests fail is reported as a failure.

perf_analyzer needs libb64 (apt) and libcudart (PyPI). The test skips only when libb64 is missing outside CI; with
`CI` set (`.ci/run` installs libb64) it must run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from served import IMAGE_MODEL
from wan_bench.perf_analyzer import LIBB64, missing_libraries, with_image
from wan_client import INPUT_DATATYPES
from wan_triton.config.deployment import Deployment
from wan_triton.config.request import validate_request

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "perf_analyzer.py"
SMALL = ROOT / "benchmarks" / "perf_analyzer" / "inputs_small.json"

# A tiny measurement: few requests per window, stability loose (this checks the harness, not the speed).
TINY = ["--request-count", "3", "--stability-pct", "500", "--max-trials", "4", "--timeout-s", "300"]


@pytest.fixture
def _libraries():
    missing = missing_libraries()
    if missing and not os.environ.get("CI"):
        libb64_missing = any(m.startswith(LIBB64) for m in missing)
        if libb64_missing and len(missing) == 1:
            pytest.skip(f"perf_analyzer cannot start here: {missing} (CI installs it)")
    assert not missing, f"perf_analyzer cannot start: {missing}"


def _harness(
    server, tmp_path: Path, input_data: Path, concurrency: list[str], model: str = "wan_onnx", extra=()
) -> subprocess.CompletedProcess:
    args = ["--url", server.grpc_url, "--model", model, "--input-data", str(input_data), *extra]
    args += ["--concurrency", *concurrency, *TINY, "--out", str(tmp_path / "pa.json")]
    return subprocess.run([sys.executable, str(HARNESS), *args], capture_output=True, text=True, timeout=900)


@pytest.mark.server
@pytest.mark.usefixtures("_libraries")
def test_table_of_real_numbers_at_two_concurrencies(server, tmp_path):
    run = _harness(server, tmp_path, SMALL, ["1", "2"])
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "pa.json").read_text())
    rows = result["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        assert r["errors"] == [], r["errors"]
        assert r["requests"] >= 3, r
        assert r["throughput_infer_per_s"] > 0
        assert 0 < r["p50_latency_ms"] <= r["p90_latency_ms"] <= r["p99_latency_ms"]
    table = (tmp_path / "pa.md").read_text().splitlines()
    assert table[0].startswith("| concurrency | throughput (infer/s) | p50 latency (ms)")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1", "2"]
    assert table == run.stdout.strip().splitlines()[-4:]


@pytest.mark.server
@pytest.mark.usefixtures("_libraries")
def test_streaming_endpoint(server, tmp_path):
    run = _harness(server, tmp_path, SMALL, ["2"], model="wan_onnx_stream", extra=["--streaming"])
    assert run.returncode == 0, run.stdout + run.stderr
    (row,) = json.loads((tmp_path / "pa.json").read_text())["rows"]
    assert row["errors"] == [] and row["requests"] >= 3 and row["throughput_infer_per_s"] > 0


@pytest.mark.server
@pytest.mark.usefixtures("_libraries")
def test_failing_requests_fail_the_harness(server, tmp_path):
    bad = json.loads(SMALL.read_text())
    bad["data"][0]["height"] = {"content": [50], "shape": [1]}  # not a multiple of 16: INVALID_ARG
    bad_file = tmp_path / "inputs_bad.json"
    bad_file.write_text(json.dumps(bad))
    run = _harness(server, tmp_path, bad_file, ["1"])
    assert run.returncode != 0
    assert "height: must be a positive multiple of 16" in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "pa.json").exists()


@pytest.mark.parametrize("path", sorted(SMALL.parent.glob("inputs_*.json")), ids=lambda p: p.name)
def test_input_files_are_valid_requests(path):
    """Every request in the shipped input files passes the cpu.yaml validation, typed as the model declares."""
    deployment = Deployment.load(ROOT / "model_repository/deployments/cpu.yaml")
    dtypes = {"BYTES": object, "INT64": np.int64, "FP32": np.float32}
    entries = json.loads(path.read_text())["data"]
    assert entries
    for entry in entries:
        assert set(entry) <= set(INPUT_DATATYPES) and "prompt" in entry
        inputs = {}
        for name, value in entry.items():
            content = value if isinstance(value, list) else value["content"]
            assert isinstance(value, list) or value["shape"] == [1]
            if INPUT_DATATYPES[name] == "BYTES":
                content = [c.encode() for c in content]
            inputs[name] = np.array(content, dtype=dtypes[INPUT_DATATYPES[name]])
        request = validate_request(inputs, deployment, 16, 4)
        assert request.seed == entry["seed"]["content"][0]


@pytest.mark.server
@pytest.mark.usefixtures("_libraries")
def test_image_sent_with_every_request(server, tmp_path):
    """`--image`: perf_analyzer sends the file as the `image` input (base64 in its input data); the image-taking
    model decodes it, so every request succeeding shows the bytes arrived intact."""
    photo = tmp_path / "photo.png"
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    photo.write_bytes(buffer.getvalue())
    # The stream model: perf_analyzer 2.51 does not find the versions of the nested ensembles that the unary endpoint
    # of a model with the result cache on is made of ("failed to find the requested model version").
    small = json.loads(SMALL.read_text())
    small["data"][0]["width"] = {"content": [64], "shape": [1]}  # the image model's sizes are multiples of 32
    inputs = tmp_path / "inputs_image.json"
    inputs.write_text(json.dumps(small))
    run = _harness(
        server, tmp_path, inputs, ["1"], model=f"{IMAGE_MODEL}_stream", extra=["--streaming", "--image", str(photo)]
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "pa.json").read_text())
    assert result["image"] == {"file": "photo.png", "bytes": photo.stat().st_size}
    (row,) = result["rows"]
    assert row["errors"] == [] and row["requests"] >= 3
    # The same image to a text-to-video model: every request is refused, and so is the run.
    refused = _harness(server, tmp_path, SMALL, ["1"], extra=["--image", str(photo)])
    assert refused.returncode != 0 and "image: this model is text-to-video" in refused.stderr, refused.stderr[-3000:]


def test_image_input_data_is_the_bytes_tensor_serialized():
    data = b"\x89PNG\x00\xff image"
    entry = with_image({"data": [{"prompt": ["a"]}, {"prompt": ["b"]}]}, data)["data"]
    assert [e["prompt"] for e in entry] == [["a"], ["b"]]
    # Triton's raw BYTES buffer: a 4-byte little-endian length, then the bytes.
    assert {base64.b64decode(e["image"]["b64"]) for e in entry} == {len(data).to_bytes(4, "little") + data}
