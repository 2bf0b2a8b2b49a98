"""The shipped Grafana dashboard (model_repository/platform/grafana/wan-triton.json) is import-ready: Grafana's
dashboard schema, panel ids and positions, and every query on the `${datasource}` Prometheus variable. Its queries
run against a real Prometheus in test_prometheus_live.py."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from deploy_tools import PLATFORM, tool

DASHBOARD = PLATFORM / "grafana" / "wan-triton.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's `$__rate_interval` is at least 4 scrape intervals; the live test scrapes every second.
RATE_INTERVAL = "5s"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict) -> list[dict]:
    """The panels that query (rows only group them)."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def substituted(expr: str) -> str:
    """The query as Grafana sends it with every model selected and the live test's rate interval."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    expr = re.sub(r"\$\{model\}|\$model", ".*", expr)
    assert "$" not in expr.replace("$1", ""), f"a variable the dashboard does not define: {expr}"
    return expr


def test_dashboard_structure():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["datasource"] == DATASOURCE
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    panels = query_panels(dashboard)
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"] and target["expr"]
    titles = {p["title"] for p in panels}
    assert {
        "Requests admitted",
        "Outcomes by step",
        "Latency per step, p95",
        "Denoising steps per second",
        "Queue",
        "Batch size",
        "Result cache hit ratio",
        "Device memory per step",
        "Replicas up",
    } <= titles


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each query (as a recording rule) without a server; a typo fails here first."""
    exprs = [substituted(t["expr"]) for p in query_panels(load_dashboard()) for t in p["targets"]]
    rules = [{"record": f"dashboard:query_{n}", "expr": expr} for n, expr in enumerate(exprs)]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [{"record": "x", "expr": exprs[0] + ")"}]}]})
    )
    assert subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True).returncode != 0
