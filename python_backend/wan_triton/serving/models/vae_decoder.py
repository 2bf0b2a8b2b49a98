"""The vae_decoder step: latents to uint8 RGB frames, and with `video.encode_while_decoding` their MP4 too."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from wan_triton.components import build_vae_decoder
from wan_triton.config.request import GenerationRequest
from wan_triton.model.denoise import latent_shape
from wan_triton.serving import model_io as io
from wan_triton.serving.models.base import response
from wan_triton.serving.models.device import DeviceModel, stop_workers
from wan_triton.serving.torch_io import read_torch
from wan_triton.serving.triton import output, read_request_json

logger = logging.getLogger("wan_triton.serving")

NO_VIDEO = np.array([b""], dtype=object)


class VaeDecoder(DeviceModel):
    role = "vae_decoder"

    def load(self) -> None:
        cfg = self.ctx.deployment.components.vae_decoder
        self.video = self.ctx.deployment.video
        self.decoder = build_vae_decoder(self.ctx.checkpoint, cfg, self.ctx.artifacts, self.ctx.device_id)
        for shape in self.ctx.deployment.warmup:
            # The whole decode warms up the chunked one too (the decoder runs the same kernels on the same shapes);
            # the encoder needs none, so the load starts no encoder thread.
            started = time.perf_counter()
            dims = latent_shape(self.ctx.checkpoint, shape.height, shape.width, shape.num_frames)
            self.decoder.frames(torch.zeros(dims))
            logger.info("%s warm-up %s: %.2f s", self.ctx.name, shape, time.perf_counter() - started)

    def handle(self, request):
        latents = read_torch(request, io.LATENTS)
        # The preview decodes of the stream model ask for frames alone.
        if not (self.video.encode_while_decoding and io.DECODED_VIDEO.name in request.requested_output_names()):
            return response(
                output(io.DECODED_FRAMES.name, self.decoder.frames(latents)), output(io.DECODED_VIDEO.name, NO_VIDEO)
            )
        req = GenerationRequest(**read_request_json(request, io.REQUEST_JSON))
        video = self.video
        frames, mp4 = self.decoder.frames_and_mp4(latents, req.fps, video.x264_preset, video.x264_crf, video.x264_tune)
        return response(
            output(io.DECODED_FRAMES.name, frames), output(io.DECODED_VIDEO.name, np.array([mp4], dtype=object))
        )

    def execute(self, requests):
        responses = super().execute(requests)
        self._record_worker_restarts(self.decoder)
        return responses

    def finalize(self) -> None:
        stop_workers(self.decoder)
        super().finalize()
