"""What a running server says about itself: its Prometheus `/metrics` text (the project's `wan_*` metrics) and
Triton's per-model statistics over gRPC."""

from __future__ import annotations

import re
import urllib.request
from typing import Any

# The ensemble's steps: Triton models `<model>_<step>` (the deployment's model_name), in request order.
STEPS = ("preprocess", "text_encoder", "scheduler", "vae_decoder", "postprocess")

_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metrics_text(port: int, host: str = "127.0.0.1") -> str:
    """The server's metrics page (Prometheus text format)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def all_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample on a metrics page."""
    return [(m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))) for m in _SAMPLE.finditer(text)]


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of the metric `name` (a histogram's parts are `<name>_sum`, `_count`,
    `_bucket`)."""
    return [(labels, value) for found, labels, value in all_samples(text) if found == name]


def batch_histogram(text: str, model: str) -> tuple[float, float]:
    """(sum, count) of the `wan_batch_size` histogram of the deployment's model name: the batch sizes the scheduler
    ran, and how many batches."""
    values = []
    for part in ("sum", "count"):
        matching = [value for labels, value in samples(text, f"wan_batch_size_{part}") if labels.get("model") == model]
        values.append(matching[0] if matching else 0.0)
    return values[0], values[1]


def device_memory(text: str) -> dict[str, float]:
    """Peak device memory (GB) of each stage's last request, from `wan_device_memory_bytes`."""
    return {labels["stage"]: value / 1e9 for labels, value in samples(text, "wan_device_memory_bytes")}


def model_stats(client: Any, model: str) -> dict[str, int]:
    """Triton's cumulative statistics of one model (a `tritonclient.grpc.InferenceServerClient`): requests
    (`inference_count`), executions (batches), compute (input + infer + output) and queue nanoseconds."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    inference = stats["inference_stats"]

    def ns(key: str) -> int:
        return int(inference.get(key, {}).get("ns", 0))

    return {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "compute_ns": ns("compute_input") + ns("compute_infer") + ns("compute_output"),
        "queue_ns": ns("queue"),
    }


def step_stats(client: Any, model: str) -> dict[str, dict[str, int]]:
    """`model_stats` of every step of the ensemble `model`."""
    return {step: model_stats(client, f"{model}_{step}") for step in STEPS}


def stats_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """What each step's counters grew by between two `step_stats`."""
    return {step: {key: after[step][key] - before[step][key] for key in after[step]} for step in after}
