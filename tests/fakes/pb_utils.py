"""A fake `triton_python_backend_utils`, the module Triton's Python backend gives the models it runs.

This module is the fake: `install(monkeypatch)` puts it in `sys.modules` under the real name, where
wan_triton.serving imports it. It has what the serving models use of it on CPU: host tensors, errors and responses,
and no `MetricFamily`, so a `StageMetrics` built on it reports nothing. `with_metrics(on_call)` is a variant with
custom metrics, whose every metric call runs `on_call`.

Below the fake: a scheduler step (`serving.models.scheduler.Scheduler`) on it, and the requests such a step receives.
"""

from __future__ import annotations

import sys
import types

import numpy as np


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def is_cpu(self) -> bool:  # host tensors, as Triton hands a CPU model its inputs
        return True


class TritonError:
    INVALID_ARG, INTERNAL, CANCELLED = "INVALID_ARG", "INTERNAL", "CANCELLED"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None) -> None:
        self.output_tensors, self.error = output_tensors or [], error


def get_input_tensor_by_name(request: dict, name: str) -> Tensor | None:
    """A fake request is a dict of its input tensors by name."""
    return request.get(name)


def install(monkeypatch) -> types.ModuleType:
    """This module as `triton_python_backend_utils`, for the test that `monkeypatch` belongs to."""
    module = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def with_metrics(on_call) -> types.SimpleNamespace:
    """A backend with custom metrics only: `MetricFamily(...).Metric(...)` objects whose increment, set and observe
    call `on_call()`."""

    class Metric:
        def __init__(self, labels, buckets=None) -> None:
            self.labels = labels

        def increment(self, value) -> None:
            on_call()

        def set(self, value) -> None:
            on_call()

        def observe(self, value) -> None:
            on_call()

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name, description, kind) -> None:
            self.name = name

        def Metric(self, labels, buckets=None):  # noqa: N802 - the Python backend's name
            return Metric(labels, buckets)

    return types.SimpleNamespace(MetricFamily=MetricFamily)


# --- a scheduler step on the fake ---------------------------------------------------------------------------------


def scheduler_model(deployment, denoiser, board):
    """`serving.models.scheduler.Scheduler` as Triton would have initialised it, with the given denoiser and job
    board; metrics off. Install the fake first."""
    from wan_triton.serving.metrics import StageMetrics
    from wan_triton.serving.models.scheduler import Scheduler

    model = Scheduler.__new__(Scheduler)
    model.ctx = types.SimpleNamespace(name="wan_t2v_scheduler", deployment=deployment, device_id=0)
    model.metrics = StageMetrics(sys.modules[__name__], "wan_t2v", "scheduler")
    model.denoiser = denoiser
    model.board = board
    return model


def scheduler_request(
    request,
    prompt_embeds: np.ndarray,
    token: str | None = None,
    preview_every: int = 0,
    condition_image: np.ndarray | None = None,
) -> dict:
    """What the scheduler step receives for `request` (a GenerationRequest): its JSON, prompt embeddings
    [1, rows, sequence, text_dim] and conditioning image [1, height, width, 3] (`condition_image`, else [1, 0, 0, 3];
    a request with `has_image` and none given gets a uniform grey one); with `token`, the job board token and the
    preview interval."""
    from wan_triton.config.request import request_json

    if condition_image is None:
        shape = (request.height, request.width, 3) if request.has_image else (0, 0, 3)
        condition_image = np.full(shape, 128, dtype=np.uint8)
    inputs = {
        "request": Tensor("request", np.array([[request_json(request)]], dtype=object)),
        "prompt_embeds": Tensor("prompt_embeds", prompt_embeds),
        "condition_image": Tensor("condition_image", condition_image[None]),
    }
    if token is not None:
        inputs["job_token"] = Tensor("job_token", np.array([[token.encode()]], dtype=object))
        inputs["preview_every"] = Tensor("preview_every", np.array([[preview_every]], dtype=np.int64))
    return inputs
