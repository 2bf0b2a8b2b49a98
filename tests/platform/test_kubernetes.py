"""The shipped Kubernetes manifests (model_repository/platform/kubernetes) against the Kubernetes API's own JSON
schemas, offline: `kubernetes-validate` (PyPI) carries the official OpenAPI-derived schemas of each Kubernetes
release, and strict mode also refuses fields the API does not have. (kubectl needs a cluster even for a client-side
dry run, and kubeconform has no package in the registries the project installs from.)

The Prometheus Operator's PodMonitor is a custom resource with no schema there; it is checked against
`PODMONITOR_SCHEMA` below, the part of the monitoring.coreos.com/v1 PodMonitor API the manifest uses (the
project ships no third-party schema files). Then the manifests' own promises: GPU, node, volumes, probes on
Triton's health endpoints with a startup budget for the warm-up, a drain on stop, a Service and monitor that find
the pods, and an autoscaler on the queue metric that prometheus-adapter serves.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy_tools import PLATFORM

KUBERNETES = PLATFORM / "kubernetes"
DEPLOYMENTS_DIR = PLATFORM.parent / "deployments"
# The oldest Kubernetes release the manifests are written for (docs/deploying.md).
KUBERNETES_VERSION = "1.30.0"
# The measured load of the A14B scheduler with its 720p warm-up on an H200; the startup budget must be twice that.
A14B_LOAD_S = 204

PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": {"type": "object"}},
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"},
                        },
                    },
                },
            },
        },
    },
}


def _documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBERNETES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def _of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in _documents() if doc["kind"] == kind]


def _validate(doc: dict) -> None:
    """Raises on the first way `doc` breaks its kind's schema."""
    if doc["kind"] == "PodMonitor":
        jsonschema.validate(doc, PODMONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_manifest_passes_its_schema():
    docs = _documents()
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert kinds == sorted(
        ["Deployment"] * 3
        + ["Service"] * 3
        + ["HorizontalPodAutoscaler"] * 3
        + ["PersistentVolumeClaim", "PodMonitor", "ConfigMap"]
    )
    for path, doc in docs:
        try:
            _validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc}")


def _deployment() -> dict:
    return copy.deepcopy(_of_kind("Deployment")[0])


def _broken() -> list[tuple[str, dict]]:
    wrong_type = _deployment()
    wrong_type["spec"]["replicas"] = "two"
    unknown_field = _deployment()
    unknown_field["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    no_name = _deployment()
    del no_name["spec"]["template"]["spec"]["containers"][0]["name"]
    bad_probe = _deployment()
    bad_probe["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["periodSeconds"] = "10s"
    bad_hpa = copy.deepcopy(_of_kind("HorizontalPodAutoscaler")[0])
    bad_hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = [2]
    bad_monitor = copy.deepcopy(_of_kind("PodMonitor")[0])
    bad_monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    monitor_typo = copy.deepcopy(_of_kind("PodMonitor")[0])
    monitor_typo["spec"]["podMetricEndpoints"] = monitor_typo["spec"].pop("podMetricsEndpoints")
    return [
        ("replicas not an integer", wrong_type),
        ("a field the API does not have", unknown_field),
        ("a container without its required name", no_name),
        ("a probe period that is not an integer", bad_probe),
        ("an autoscaler target that is not a quantity", bad_hpa),
        ("a scrape interval that is not a duration", bad_monitor),
        ("a misspelt PodMonitor field", monitor_typo),
    ]


@pytest.mark.parametrize("what, doc", _broken(), ids=[what for what, _ in _broken()])
def test_a_broken_manifest_is_refused(what, doc):
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        _validate(doc)


def _server(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "tritonserver")


def test_deployments_serve_one_model_kind_each_on_an_h100():
    built = set()
    for deployment in _of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        server = _server(deployment)
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
        # The model repository is rendered by `make build` from the checkpoint volume before the server starts.
        (build,) = pod["initContainers"]
        assert build["command"][:2] == ["make", "build"]
        settings = dict(arg.split("=", 1) for arg in build["command"][2:])
        assert settings["REPO"] == "/repo" and settings["MODEL"].startswith("/models/")
        deployment_file = Path(settings["DEPLOYMENT"]).name
        assert (DEPLOYMENTS_DIR / deployment_file).is_file()
        built.add(deployment_file)
        assert "REPO=/repo" in server["command"] and server["command"][:2] == ["make", "serve"]
        claims = {v["name"]: v for v in pod["volumes"]}
        assert (
            claims["models"]["persistentVolumeClaim"]["claimName"]
            == _of_kind("PersistentVolumeClaim")[0]["metadata"]["name"]
        )
        mounts = {m["name"]: m for m in server["volumeMounts"]}
        assert mounts["models"]["readOnly"] and mounts["repo"]["mountPath"] == "/repo"
        assert claims["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"]["mountPath"] == "/dev/shm"
    assert built == {"gpu_a14b.yaml", "gpu_i2v_a14b.yaml", "gpu_ti2v_5b.yaml"}


def test_probes_use_tritons_health_endpoints_and_cover_the_warm_up():
    for deployment in _of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        server = _server(deployment)
        for probe, path in [
            ("startupProbe", "/v2/health/ready"),
            ("readinessProbe", "/v2/health/ready"),
            ("livenessProbe", "/v2/health/live"),
        ]:
            assert server[probe]["httpGet"] == {"path": path, "port": "http"}, probe
        startup = server["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 2 * A14B_LOAD_S
        # Draining: the Service stops routing here during preStop, then the server finishes what it has.
        pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep" and 0 < int(pre_stop[1]) < pod["terminationGracePeriodSeconds"]
        # The server's stop (its exit timeout, then the launcher's kill 5 s later) ends inside the grace period, so
        # the kubelet's SIGKILL never cuts the launcher's cleanup short.
        serve = dict(arg.split("=", 1) for arg in server["command"][2:])
        assert int(pre_stop[1]) + int(serve["EXIT_TIMEOUT_S"]) + 5 < pod["terminationGracePeriodSeconds"]


def test_services_monitor_and_autoscalers_find_the_pods():
    deployments = {d["metadata"]["name"]: d for d in _of_kind("Deployment")}
    (monitor,) = _of_kind("PodMonitor")
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (service,) = [s for s in _of_kind("Service") if s["metadata"]["name"] == name]
        assert service["spec"]["selector"].items() <= labels.items()
        ports = {p["name"] for p in _server(deployment)["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} == ports
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
        (hpa,) = [h for h in _of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name]
        assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "wan_queue_length"
    # The job label the alert rules match (job=~".*wan-triton.*") comes from the pods' app.kubernetes.io/name.
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] for d in deployments.values()} == {
        "wan-triton"
    }


def test_prometheus_adapter_serves_the_queue_metric_per_pod():
    (config_map,) = _of_kind("ConfigMap")
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == "wan_queue_length"
    assert rule["seriesQuery"].startswith("nv_inference_pending_request_count{")
    assert '_scheduler"' in rule["seriesQuery"] and '_scheduler"' in rule["metricsQuery"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
