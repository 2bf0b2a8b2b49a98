"""CUDA-graph replay of a torch engine's forward, one graph per input signature.

A denoiser forward is a few thousand kernel launches (40 blocks of norms, GEMMs, attention, rotary, gating). At
small shapes the GPU finishes kernels faster than Python and the launch path can issue them, so the step time is
launch-bound; a captured graph issues the whole forward as one launch. At 720p the kernels are long and the launch
cost is hidden either way.

A graph is keyed by every input's name, shape, dtype and device, and replayed only over its own static input
buffers: inputs are copied in before each replay, and the output is cloned out, so callers never hold memory the
next replay overwrites. All graphs of one engine share one memory pool: they never run concurrently, and each
replay rewrites its own intermediates, so sharing is safe and keeps the activation memory of one shape, not one
per shape. A capture that fails (an operation that cannot be captured) falls back to eager for that signature
and says so in the log.

Collectives (a rank of a parallel plan: Ulysses all-to-alls, tensor-parallel all-reduces inside the forward) are
captured with the rest: NCCL operations are capturable, with one rule (NCCL's "Using NCCL with CUDA Graphs"):
whether an operation is captured must be the same on every rank of its communicator, and a graph holding one is
launched by all of them. The ranks see the same requests in the same order, so they capture the same signatures
at the same call; the warm-up runs before capture also initialise the communicators and their peer connections,
which NCCL asks for before capturing point-to-point operations (an all-to-all is made of them). A rank whose
capture failed must not go on eagerly while its peers replay, so such an engine (`eager_fallback=False`) raises
instead, and the request fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from wan_triton.model.engine import Engine
from wan_triton.runtime.engines.torch_engine import TorchEngine

logger = logging.getLogger(__name__)

Signature = tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class CudaGraphEngine(Engine):
    """Runs `inner` (a CUDA torch engine) by replaying a graph captured on the first call of each signature."""

    def __init__(self, inner: TorchEngine, warmup_runs: int = 2, eager_fallback: bool = True) -> None:
        if inner.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA engine")
        self.inner = inner
        self.eager_fallback = eager_fallback
        self.kind = inner.kind
        self.device = inner.device
        self.dtype = inner.dtype
        self.warmup_runs = warmup_runs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Signature, _Captured | None] = {}  # None: capture failed, run eagerly

    @staticmethod
    def signature(inputs: dict[str, torch.Tensor]) -> Signature:
        return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(inputs.items()))

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prepared = {name: self.inner.prepare(t, name) for name, t in inputs.items()}
        key = self.signature(prepared)
        if key not in self.graphs:
            self.graphs[key] = self._capture(key, prepared)
        captured = self.graphs[key]
        if captured is None:
            return self.inner.run(prepared)
        for name, tensor in prepared.items():
            captured.inputs[name].copy_(tensor)
        captured.graph.replay()
        return {name: out.clone() for name, out in captured.outputs.items()}

    def _capture(self, key: Signature, inputs: dict[str, torch.Tensor]) -> _Captured | None:
        static = {name: t.clone() for name, t in inputs.items()}
        # Warm-up on a side stream, as torch.cuda.graphs asks: lazy initialisation (cuBLAS workspaces, compiled
        # kernels' autotuning) must happen before capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                self.inner.run(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.inner.run(static)
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            if not self.eager_fallback:
                raise RuntimeError(f"CUDA-graph capture failed for {key}: {exc}") from exc
            logger.warning("CUDA-graph capture failed for %s; running it eagerly", key, exc_info=True)
            return None
        logger.info("captured a CUDA graph for %s", [(n, s) for n, s, _, _ in key])
        return _Captured(graph, static, outputs)
