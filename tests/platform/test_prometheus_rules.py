"""The shipped Prometheus configuration and rules (model_repository/platform/prometheus) under promtool: the config
and rules are valid, the shipped rule unit tests pass, they exercise every alert firing and not firing and every
recording rule, and they fail when a rule changes."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from deploy_tools import PLATFORM, tool

PROMETHEUS = PLATFORM / "prometheus"


def _promtool(*args: str, cwd=PROMETHEUS) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _rules(name: str) -> list[dict]:
    return [
        rule for group in yaml.safe_load((PROMETHEUS / "rules" / name).read_text())["groups"] for rule in group["rules"]
    ]


def test_config_and_rules_pass_promtool_check():
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "2 rule files found" in config.stdout, config.stdout
    rules = _promtool("check", "rules", "rules/recording.yml", "rules/alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_rule_unit_tests_pass():
    result = _promtool("test", "rules", "tests/alerts_test.yml", "tests/recording_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == 2, result.stdout


def test_rule_tests_cover_every_alert_firing_and_not_and_every_recording_rule():
    alerts = {rule["alert"] for rule in _rules("alerts.yml")}
    cases = [
        case
        for test in yaml.safe_load((PROMETHEUS / "tests" / "alerts_test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts == {
        "WanServerNotReady",
        "WanQueueNearLimit",
        "WanRequestsFailing",
        "WanDeviceMemoryNearFull",
        "WanWorkerGroupRestarting",
    }
    assert fired == alerts and quiet == alerts, (alerts - fired, alerts - quiet)

    recorded = {rule["record"] for rule in _rules("recording.yml")}
    exprs = [
        case["expr"]
        for test in yaml.safe_load((PROMETHEUS / "tests" / "recording_test.yml").read_text())["tests"]
        for case in test["promql_expr_test"]
    ]
    assert all(any(expr.startswith(name) for expr in exprs) for name in recorded), recorded


def test_rule_tests_fail_when_a_threshold_changes(tmp_path):
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, copy)
    alerts = copy / "rules" / "alerts.yml"
    text = alerts.read_text()
    assert "wan:queue_fill:ratio > 0.8" in text
    alerts.write_text(text.replace("wan:queue_fill:ratio > 0.8", "wan:queue_fill:ratio > 0.9"))
    result = _promtool("test", "rules", "tests/alerts_test.yml", cwd=copy)
    assert result.returncode != 0
    assert "WanQueueNearLimit" in result.stdout + result.stderr
