"""The vae_decoder step: latents to uint8 RGB frames."""

from __future__ import annotations

import logging
import time

import torch

from wan_triton.components import build_vae_decoder
from wan_triton.model.denoise import latent_shape
from wan_triton.serving import model_io as io
from wan_triton.serving.models.base import response
from wan_triton.serving.models.device import DeviceModel, stop_workers
from wan_triton.serving.torch_io import read_torch
from wan_triton.serving.triton import output

logger = logging.getLogger("wan_triton.serving")


class VaeDecoder(DeviceModel):
    role = "vae_decoder"

    def load(self) -> None:
        cfg = self.ctx.deployment.components.vae_decoder
        self.decoder = build_vae_decoder(self.ctx.checkpoint, cfg, self.ctx.artifacts, self.ctx.device_id)
        for shape in self.ctx.deployment.warmup:
            started = time.perf_counter()
            dims = latent_shape(self.ctx.checkpoint, shape.height, shape.width, shape.num_frames)
            self.decoder.frames(torch.zeros(dims))
            logger.info("%s warm-up %s: %.2f s", self.ctx.name, shape, time.perf_counter() - started)

    def handle(self, request):
        latents = read_torch(request, io.LATENTS)
        return response(output(io.DECODED_FRAMES.name, self.decoder.frames(latents)))

    def execute(self, requests):
        responses = super().execute(requests)
        self._record_worker_restarts(self.decoder)
        return responses

    def finalize(self) -> None:
        stop_workers(self.decoder)
        super().finalize()
