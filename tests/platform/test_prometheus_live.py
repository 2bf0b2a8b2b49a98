"""A real Prometheus scrapes the test session's Triton server with the shipped configuration and rules
(model_repository/platform/prometheus), and answers the shipped Grafana dashboard's queries
(model_repository/platform/grafana/wan-triton.json).

Prometheus runs as a foreground process of this module: its config is the shipped prometheus.yml with the server's
metrics port as the one target (the targets file) and 1 s scrape and rule intervals, its storage in a temporary
folder. After a few requests (successes, a refused one, a result-cache hit) the test reads its HTTP API.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

import pytest
import tritonclient.grpc as grpcclient
import yaml
from test_grafana_dashboard import load_dashboard, query_panels, substituted
from tritonclient.utils import InferenceServerException

from deploy_tools import PLATFORM, tool
from served import CACHED_MODEL, PARALLEL_MODEL, REQUEST, SERVING, infer
from wan_triton.tritonserver.launch import free_port

SMALL = {**REQUEST, "height": 16, "width": 16, "num_frames": 1, "num_inference_steps": 2}
SERVED = "wan_onnx"  # a cpu.yaml rendering of tests/served.py
# Panels of GPU servers only: their queries must run, but have no data on CPU.
GPU_ONLY = {"GPU memory"}


@dataclass
class Prometheus:
    url: str
    started: float
    process: subprocess.Popen

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        assert not body.get("warnings"), body["warnings"]
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, timeout_s: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if result := self.query(expr):
                return result
            time.sleep(0.5)
        raise AssertionError(f"Prometheus has no result for {expr} after {timeout_s} s\n{self.diagnosis()}")

    def diagnosis(self) -> str:
        """The scrapes' health and the rules' last errors, for a failure message."""
        targets = [(t["health"], t["lastError"], t["lastScrapeDuration"]) for t in self.api("targets")["activeTargets"]]
        rules = [(r["name"], r["health"], r.get("lastError")) for g in self.api("rules")["groups"] for r in g["rules"]]
        scrapes = self.query("up[30s]")
        successes = self.query('wan_requests_total{stage="scheduler", outcome="success"}[60s]')
        return f"targets: {targets}\nrules: {rules}\nup: {scrapes}\nscheduler successes: {successes}"


def _configure(folder, metrics_port: int) -> None:
    """The shipped configuration, with this server as its one target and intervals of 1 s."""
    shutil.copytree(PLATFORM / "prometheus", folder)
    (folder / "targets" / "wan-triton.yml").write_text(yaml.safe_dump([{"targets": [f"127.0.0.1:{metrics_port}"]}]))
    config = yaml.safe_load((folder / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))


def _send_requests(server) -> None:
    # Each asks for the frames, as a client does: every step of the pipeline runs for it.
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for seed in (1, 2, 3):
        infer(client, SERVED, {**SMALL, "seed": seed}, ("frames",))
    with pytest.raises(InferenceServerException, match="height"):
        infer(client, SERVED, {**SMALL, "height": 17}, ("frames",))
    for _ in range(2):  # a miss, then a hit
        infer(client, CACHED_MODEL, {**SMALL, "seed": 99}, ("frames",))


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus")
    _configure(root / "config", server.metrics_port)
    port = free_port()
    log = (root / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={root / 'config' / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    running = Prometheus(f"http://127.0.0.1:{port}", time.time(), process)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (root / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{running.url}/-/ready", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "prometheus not ready after 60 s"
                time.sleep(0.3)
        # A scrape before the requests, so that rates see the counters rise.
        running.wait_for('up{job="wan-triton"} == 1')
        before = running.query(f'wan_requests_total{{model="{SERVED}", stage="preprocess", outcome="success"}}')
        admitted = float(before[0]["value"][1])
        _send_requests(server)
        running.wait_for(
            f'wan_requests_total{{model="{SERVED}", stage="preprocess", outcome="success"}} >= {admitted + 3}'
        )
        running.wait_for(f'wan:requests:rate5m{{model="{SERVED}", stage="scheduler", outcome="success"}} > 0')
        time.sleep(3)  # a few more scrapes and rule evaluations after the last request
        yield running
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _labels(result: list[dict]) -> list[dict]:
    return [series["metric"] for series in result]


def test_wan_series_are_scraped_with_their_labels(prometheus):
    requests = _labels(prometheus.query(f'wan_requests_total{{model="{SERVED}"}}'))
    assert {(m["stage"], m["outcome"]) for m in requests} >= {
        ("preprocess", "success"),
        ("preprocess", "invalid_arg"),
        ("scheduler", "success"),
        ("vae_decoder", "success"),
    }
    assert all(m["job"] == "wan-triton" and m["instance"] for m in requests)
    buckets = _labels(prometheus.query(f'wan_stage_seconds_bucket{{model="{SERVED}", stage="scheduler"}}'))
    assert {m["le"] for m in buckets} >= {"0.01", "600", "+Inf"}
    assert prometheus.query(f'wan_denoise_steps_total{{model="{SERVED}"}} > 0')
    assert prometheus.query(f'wan_batch_size_count{{model="{SERVED}"}} > 0')
    stages = {"preprocess", "text_encoder", "scheduler", "vae_decoder", "postprocess", "stream"}
    assert {m["stage"] for m in _labels(prometheus.query(f'wan_model_ready{{model="{SERVED}"}} == 1'))} == stages
    limit = prometheus.query(f'wan_queue_limit{{model="{SERVED}"}}')
    assert float(limit[0]["value"][1]) == SERVING[SERVED]["max_queue_size"]
    restarts = _labels(prometheus.query(f'wan_worker_group_restarts_total{{model="{PARALLEL_MODEL}"}}'))
    assert {m["stage"] for m in restarts} >= {"scheduler", "vae_decoder"}
    assert _labels(prometheus.query(f'wan_device_memory_bytes{{model="{SERVED}", stage="scheduler"}}'))


def test_triton_series_are_scraped_with_their_labels(prometheus):
    success = _labels(prometheus.query(f'nv_inference_request_success{{model="{SERVED}_scheduler"}} > 0'))
    assert success and success[0]["version"] == "1" and success[0]["job"] == "wan-triton"
    for name in ("nv_inference_queue_duration_us", "nv_inference_pending_request_count", "nv_inference_count"):
        assert prometheus.query(f'{name}{{model="{SERVED}_scheduler"}}'), name
    reasons = {m["reason"] for m in _labels(prometheus.query(f'nv_inference_request_failure{{model="{SERVED}"}}'))}
    assert reasons >= {"REJECTED", "BACKEND", "OTHER"}
    assert prometheus.query(f'nv_cache_num_hits_per_model{{model="{CACHED_MODEL}_pipeline"}} >= 1')
    assert prometheus.query("nv_cpu_memory_total_bytes > 0")


def test_recording_rules_are_loaded_and_record_values(prometheus):
    groups = prometheus.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"wan-triton.recording", "wan-triton.alerts"}
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
    recorded = [rule["name"] for g in groups for rule in g["rules"] if rule["type"] == "recording"]
    assert len(recorded) == 10
    for name in recorded:
        values = [float(s["value"][1]) for s in prometheus.query(name)]
        assert any(math.isfinite(v) for v in values), (name, values)
    assert float(prometheus.query(f'wan:queue_fill:ratio{{model="{SERVED}"}}')[0]["value"][1]) == 0.0
    assert float(prometheus.query(f'wan:admitted_requests:rate5m{{model="{SERVED}"}}')[0]["value"][1]) > 0
    hits = prometheus.query(f'wan:cache_hits:ratio_rate5m{{model="{CACHED_MODEL}_pipeline"}}')
    assert 0 < float(hits[0]["value"][1]) < 1
    # No alert fires on a healthy server.
    assert not prometheus.api("alerts")["alerts"]


# --- the Grafana dashboard ------------------------------------------------------------------------------------------


def test_every_dashboard_query_runs_and_the_core_panels_have_data(prometheus):
    end = time.time()
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            expr = substituted(target["expr"])
            data = prometheus.api("query_range", query=expr, start=prometheus.started, end=end, step="1s")
            values = [float(v) for series in data["result"] for _, v in series["values"]]
            if panel["title"] in GPU_ONLY:
                continue
            assert any(math.isfinite(v) for v in values), (panel["title"], expr)
