"""The steps that run a model (text_encoder, scheduler, vae_decoder): their device memory and worker groups."""

from __future__ import annotations

import torch

from wan_triton.serving.models.base import StepModel


class DeviceModel(StepModel):
    def _record_device_memory(self) -> None:
        """Report the step's peak device memory, then hand its cached blocks back to the driver.

        Every step is its own process with its own caching allocator on the same GPU: blocks one process keeps
        cached after a request (the VAE step after a 720p decode held several times its own peak) are memory the
        others cannot get, and the scheduler then runs out at load or at its next 720p step.
        """
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.metrics.device_memory_peak(torch.cuda.max_memory_allocated(self.ctx.device_id))
            torch.cuda.reset_peak_memory_stats(self.ctx.device_id)
            self._release_cached_device_memory()

    def _release_cached_device_memory(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _record_worker_restarts(self, component) -> None:
        """Count restarts of the step's worker group; a component that runs in this process has none."""
        restarts = getattr(component, "restarts", None)
        if restarts is not None:
            self.metrics.worker_group_restarts(restarts)


def stop_workers(component) -> None:
    """Stop the processes of a worker group (a parallel plan's denoiser, a split decode); a component that runs in
    this process has none."""
    close = getattr(component, "close", None)
    if close is not None:
        close()
