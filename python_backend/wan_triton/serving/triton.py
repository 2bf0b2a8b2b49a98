"""Glue between Triton's Python backend (`triton_python_backend_utils`) and the library.

Kept apart from the model classes so unit tests can run them against a fake `triton_python_backend_utils`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.dlpack

from ..checkpoint import Checkpoint
from ..deployment import Deployment
from ..request import InvalidRequestError
from .metrics import StageMetrics
from .model_io import IO

logger = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"
REPOSITORY_MARKER = ".wan_t2v_repository"  # marks a model repository that `make build` rendered


def pb_utils():
    """The Python backend's utility module; only importable inside a Triton stub process (or a test's fake)."""
    import triton_python_backend_utils

    return triton_python_backend_utils


@dataclass(frozen=True)
class ModelContext:
    """What every model reads at load time from Triton's `initialize(args)`."""

    name: str
    deployment: Deployment
    checkpoint: Checkpoint
    artifacts: Path  # the model's version folder, holding its exported graphs
    device_id: int

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ModelContext:
        model_dir = Path(args["model_repository"])
        deployment = Deployment.model_validate_json((model_dir / DEPLOYMENT_FILE).read_text(encoding="utf-8"))
        if deployment.checkpoint is None:
            raise ValueError(f"{model_dir / DEPLOYMENT_FILE}: no checkpoint recorded; re-run `make build MODEL=...`")
        return cls(
            name=args["model_name"],
            deployment=deployment,
            checkpoint=Checkpoint.open(deployment.checkpoint),
            artifacts=model_dir / str(args["model_version"]),
            device_id=int(args.get("model_instance_device_id", 0) or 0),
        )


def read_inputs(request, names: list[str]) -> dict[str, np.ndarray | None]:
    """Each named input as numpy, or None where the client left an optional input out."""
    pb = pb_utils()
    out: dict[str, np.ndarray | None] = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        out[name] = None if tensor is None else tensor.as_numpy()
    return out


def read_request_json(request, io: IO) -> dict[str, Any]:
    raw = read_inputs(request, [io.name])[io.name]
    if raw is None:
        raise ValueError(f"internal tensor {io.name!r} missing")
    return json.loads(bytes(raw.reshape(-1)[0]).decode("utf-8"))


def output(name: str, array: np.ndarray):
    return pb_utils().Tensor(name, array)


def read_torch(request, io: IO) -> torch.Tensor:
    """A required input as a torch tensor where Triton put it: GPU tensors arrive through DLPack without a copy
    (models on a GPU are rendered with FORCE_CPU_ONLY_INPUT_TENSORS=no), host tensors through numpy."""
    tensor = pb_utils().get_input_tensor_by_name(request, io.name)
    if tensor is None:
        raise ValueError(f"internal tensor {io.name!r} missing")
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy())
    return torch.from_dlpack(tensor.to_dlpack())


def output_torch(name: str, tensor: torch.Tensor):
    """An output from a torch tensor: a GPU tensor is handed over through DLPack and stays on its GPU, so the latents
    and the prompt embeddings never make a host round trip between GPU steps."""
    if tensor.is_cuda:
        return pb_utils().Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor.contiguous()))
    return pb_utils().Tensor(name, tensor.contiguous().numpy())


def error_response(exc: BaseException, model_name: str):
    """INVALID_ARG for bad input (the message names the field); INTERNAL, logged with traceback, otherwise."""
    pb = pb_utils()
    if isinstance(exc, InvalidRequestError):
        logger.info("%s rejected a request: %s", model_name, exc)
        return pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.INVALID_ARG))
    logger.error("%s failed a request", model_name, exc_info=exc)
    return pb.InferenceResponse(error=pb.TritonError(f"{model_name}: internal error: {exc}", pb.TritonError.INTERNAL))


def execute_each(requests, model_name: str, handle, metrics: StageMetrics | None = None) -> list:
    """Run `handle(request) -> InferenceResponse` per request; one bad request never fails the others."""
    responses = []
    for request in requests:
        started = time.perf_counter()
        try:
            responses.append(handle(request))
            outcome = "success"
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
            responses.append(error_response(exc, model_name))
            outcome = "invalid_arg" if isinstance(exc, InvalidRequestError) else "error"
        if metrics is not None:
            metrics.request_done(time.perf_counter() - started, outcome)
    return responses
