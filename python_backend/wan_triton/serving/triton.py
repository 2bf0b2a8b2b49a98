"""Glue between Triton's Python backend (`triton_python_backend_utils`) and the library.

Kept apart from the model classes so unit tests can run them against a fake `triton_python_backend_utils`. Tensors
are numpy here, so the steps that run no model import no torch (only a GPU tensor a BLS call returns is read through
torch); the steps that run a model take and give torch tensors through `torch_io`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wan_triton.config.deployment import DEPLOYMENT_FILE, Deployment
from wan_triton.config.request import InvalidRequestError
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.serving.metrics import StageMetrics
from wan_triton.serving.model_io import IO
from wan_triton.serving.stopping import RequestStopped

logger = logging.getLogger(__name__)


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
            checkpoint=Checkpoint.open(
                deployment.checkpoint, deployment.components.denoiser.loras, deployment.scheduler
            ),
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


# What Triton answers (UNAVAILABLE) when a request finds a step's queue full (deployment `serving:`).
QUEUE_FULL_MESSAGE = "Exceeds maximum queue size"


class StageError(Exception):
    """A step called through BLS answered with an error. Triton 2.51 hands a BLS caller every error as INTERNAL
    (triton-inference-server/server#7804), so the code is recovered where it can be: Triton's queue-full refusal is
    UNAVAILABLE; the stream model checks bad input itself before calling a step and knows when it cancelled."""

    def __init__(self, model_name: str, message: str) -> None:
        super().__init__(message)
        self.model_name = model_name
        self.code_name = "UNAVAILABLE" if QUEUE_FULL_MESSAGE in message else "INTERNAL"


def error_message(exc: BaseException, model_name: str) -> tuple[str, str]:
    """The Triton code's name and the message for a failed request (and its log line): INVALID_ARG for bad input
    (the message names the field); CANCELLED for a cancelled request or a passed deadline (the message says which);
    a called step's code for its error; INTERNAL, logged with traceback, otherwise."""
    if isinstance(exc, InvalidRequestError):
        logger.info("%s rejected a request: %s", model_name, exc)
        return "INVALID_ARG", str(exc)
    if isinstance(exc, RequestStopped):
        logger.info("%s stopped a request: %s", model_name, exc)
        return "CANCELLED", str(exc)
    if isinstance(exc, StageError):
        logger.info("%s: %s answered with an error: %s", model_name, exc.model_name, exc)
        return exc.code_name, f"{exc.model_name}: {exc}"
    logger.error("%s failed a request", model_name, exc_info=exc)
    return "INTERNAL", f"{model_name}: internal error: {exc}"


def error_response(exc: BaseException, model_name: str, tag_code: bool = False):
    """The error response for a failed request (see `error_message`). `tag_code` puts the code's name in front of
    the message ("[CANCELLED] ..."): a gRPC stream's error carries a message but no status code."""
    pb = pb_utils()
    code, message = error_message(exc, model_name)
    if tag_code:
        message = f"[{code}] {message}"
    return pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, code)))


def outcome_of(exc: BaseException | None) -> str:
    """The `wan_requests_total` outcome label of a request that raised `exc` (None: it succeeded)."""
    if exc is None:
        return "success"
    if isinstance(exc, InvalidRequestError):
        return "invalid_arg"
    if isinstance(exc, RequestStopped):
        return exc.reason
    return "error"


def execute_each(requests, model_name: str, handle, metrics: StageMetrics | None = None) -> list:
    """Run `handle(request) -> InferenceResponse` per request; one bad request never fails the others."""
    responses = []
    for request in requests:
        started = time.perf_counter()
        failure = None
        try:
            responses.append(handle(request))
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
            responses.append(error_response(exc, model_name))
            failure = exc
        if metrics is not None:
            metrics.request_done(time.perf_counter() - started, outcome_of(failure))
    return responses


def _bls_inputs(inputs: dict) -> list:
    """BLS request inputs: numpy arrays become Tensors; a Tensor from an earlier BLS response (same name) goes in
    as it is, so a GPU tensor (DLPack from a GPU step) never passes through host memory here."""
    pb = pb_utils()
    return [pb.Tensor(name, value) if isinstance(value, np.ndarray) else value for name, value in inputs.items()]


def bls_infer(model_name: str, inputs: dict, outputs: list[str], keep: tuple[str, ...] = ()) -> dict:
    """Call another model of this server (BLS) and return the named outputs as numpy arrays, those in `keep` as the
    response's own Tensors (to pass on to the next step); its error raises StageError."""
    pb = pb_utils()
    request = pb.InferenceRequest(model_name=model_name, inputs=_bls_inputs(inputs), requested_output_names=outputs)
    response = request.exec()
    if response.has_error():
        raise StageError(model_name, response.error().message())
    out: dict = {}
    for name in outputs:
        tensor = pb.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise ValueError(f"{model_name}: BLS response without output {name!r}")
        out[name] = tensor if name in keep else host_numpy(tensor)
    return out


def host_numpy(tensor) -> np.ndarray:
    """A Tensor's data on the host: `as_numpy()` fails on a GPU tensor, which is read through DLPack instead."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    # Imported here: only a GPU tensor needs it, and the host-only steps (the stream model) otherwise never load it.
    import torch

    return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()
