"""What every step model does around its own work: load at `initialize`, one response per request with metrics,
release at `finalize`. Host-only: the steps that hold device memory add that in `device.DeviceModel`."""

from __future__ import annotations

import gc
import logging
import time

from wan_triton.serving.metrics import StageMetrics
from wan_triton.serving.triton import ModelContext, execute_each, pb_utils

logger = logging.getLogger("wan_triton.serving")


def configure_logging() -> None:
    # Triton captures the stub's stderr into its own log.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class StepModel:
    role: str

    def initialize(self, args: dict) -> None:
        configure_logging()
        self.ctx = ModelContext.from_args(args)
        self.metrics = StageMetrics(pb_utils(), self.ctx.deployment.model_name, self.role)
        started = time.perf_counter()
        self.load()
        self._release_cached_device_memory()
        self.metrics.loaded(True)
        logger.info("%s loaded in %.2f s", self.ctx.name, time.perf_counter() - started)

    def _record_device_memory(self) -> None:
        """Report the step's peak device memory and release its cached blocks: nothing to do on the host."""

    def _release_cached_device_memory(self) -> None:
        """Hand cached device memory back to the driver: nothing to do on the host."""

    def load(self) -> None:
        """Load weights/engines; called once per model instance."""

    def handle(self, request):
        raise NotImplementedError

    def execute(self, requests):
        responses = execute_each(requests, self.ctx.name, self.handle, self.metrics)
        self._record_device_memory()
        return responses

    def finalize(self) -> None:
        # Objects of the Python backend caught in reference cycles are otherwise freed at interpreter exit, after the
        # stub has unmapped the shared memory they point into: the stub then segfaults after a clean unload (seen in
        # the kernel log, not Triton's; docs/triton-2.51-notes.md). Free them while it is still mapped.
        gc.collect()
        self.metrics.loaded(False)
        self.metrics.close()  # before the stub tears down its shared memory (wan_triton.serving.metrics)
        logger.info("%s unloaded", self.ctx.name)


def response(*tensors):
    return pb_utils().InferenceResponse(output_tensors=list(tensors))
