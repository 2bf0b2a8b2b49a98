"""ONNX Runtime engine: runs one exported graph (`build/wan_build/export_onnx.py`) on named torch tensors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from wan_triton.config.deployment import EngineKind
from wan_triton.model.engine import Engine

logger = logging.getLogger(__name__)

# ONNX Runtime's type strings for the tensor types the exported graphs use.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(uint8)": np.dtype(np.uint8),
}


class OnnxRuntimeEngine(Engine):
    """One `onnxruntime.InferenceSession`. Inputs are bound by the graph's input names and cast to the graph's
    dtypes; outputs come back as CPU torch tensors over the fresh arrays `session.run` returns, which no later call
    reuses (so the caller owns them)."""

    kind = EngineKind.ONNXRUNTIME

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        intra_op_num_threads: int | None = None,
        session_options=None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX graph")
        if session_options is None:
            options = ort.SessionOptions()
            # The CPU arena keeps the peak of every input shape a server has seen and never gives it back: a
            # long-running model serving many shapes grows by gigabytes. Plain allocations are returned after each
            # run, at a small cost in speed.
            options.enable_cpu_mem_arena = False
        else:
            options = session_options
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        self.session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = {i.name: _NUMPY_DTYPES.get(i.type) for i in inputs}
        logger.debug("%s: onnxruntime session on %s", self.path.name, self.session.get_providers())

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise KeyError(f"{self.path.name}: missing inputs {missing}; the graph takes {self.input_names}")
        feeds = {name: self._to_numpy(name, inputs[name]) for name in self.input_names}
        outputs = self.session.run(self.output_names, feeds)
        return {name: torch.from_numpy(np.asarray(out)) for name, out in zip(self.output_names, outputs, strict=True)}

    def _to_numpy(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        array = tensor.detach().cpu().contiguous().numpy()
        dtype = self._dtypes[name]
        # e.g. an int32 timestep or a float16 latent fed to a float32 graph: cast rather than fail in ORT.
        return array if dtype is None or array.dtype == dtype else array.astype(dtype)
