"""The Python-backend model classes of the `wan_t2v` ensemble; each model.py re-exports one as TritonPythonModel.

preprocess -> text_encoder -> scheduler (the denoising loop, owning both experts in its own process) ->
vae_decoder -> postprocess. See `model_io` for the tensors between them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
import torch

from ..components import build_denoiser, build_text_encoder, build_vae_decoder, warm_up_denoiser
from ..denoise import latent_shape
from ..pipeline import prompts_for
from ..request import GenerationRequest, validate_request
from ..text import PromptTokenizer, encode_tokens
from ..video import encode_mp4, to_uint8_frames
from . import model_io as io
from .metrics import StageMetrics
from .triton import (
    ModelContext,
    execute_each,
    output,
    output_torch,
    pb_utils,
    read_inputs,
    read_request_json,
    read_torch,
)

logger = logging.getLogger("wan_triton.serving")


def _configure_logging() -> None:
    # Triton captures the stub's stderr into its own log.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class _Model:
    role: str

    def initialize(self, args: dict) -> None:
        _configure_logging()
        self.ctx = ModelContext.from_args(args)
        self.metrics = StageMetrics(pb_utils(), self.ctx.deployment.model_name, self.role)
        started = time.perf_counter()
        self.load()
        logger.info("%s loaded in %.2f s", self.ctx.name, time.perf_counter() - started)

    def load(self) -> None:
        """Load weights/engines; called once per model instance."""

    def handle(self, request):
        raise NotImplementedError

    def execute(self, requests):
        responses = execute_each(requests, self.ctx.name, self.handle, self.metrics)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.metrics.device_memory_peak(torch.cuda.max_memory_allocated(self.ctx.device_id))
            torch.cuda.reset_peak_memory_stats(self.ctx.device_id)
        return responses

    def finalize(self) -> None:
        logger.info("%s unloaded", self.ctx.name)


class Preprocess(_Model):
    """Validate the request, fill defaults, tokenize the prompt (and negative prompt when guidance is on)."""

    role = "preprocess"

    def load(self) -> None:
        self.tokenizer = PromptTokenizer(self.ctx.checkpoint.load_tokenizer())

    def handle(self, request):
        inputs = read_inputs(request, [t.name for t in io.REQUEST_INPUTS])
        ckpt = self.ctx.checkpoint
        req = validate_request(inputs, self.ctx.deployment, ckpt.spatial_multiple, ckpt.vae_scale_factor_temporal)
        tokens = self.tokenizer(prompts_for(req))
        return _response(
            output(io.REQUEST_JSON.name, np.array([json.dumps(dataclasses.asdict(req)).encode()], dtype=object)),
            output(io.INPUT_IDS.name, tokens.input_ids),
            output(io.ATTENTION_MASK.name, tokens.attention_mask),
            output(io.USED_SEED.name, np.array([req.seed], dtype=np.int64)),
        )


class TextEncoder(_Model):
    role = "text_encoder"

    def load(self) -> None:
        cfg = self.ctx.deployment.components.text_encoder
        self.engine = build_text_encoder(self.ctx.checkpoint, cfg, self.ctx.artifacts, self.ctx.device_id)

    def handle(self, request):
        inputs = read_inputs(request, [io.INPUT_IDS.name, io.ATTENTION_MASK.name])
        ids = torch.from_numpy(inputs[io.INPUT_IDS.name])
        embeds = encode_tokens(self.engine, ids, torch.from_numpy(inputs[io.ATTENTION_MASK.name]))
        return _response(output_torch(io.PROMPT_EMBEDS.name, embeds))


class Scheduler(_Model):
    """Runs the whole denoising loop in this process: no Triton round trip per step."""

    role = "scheduler"

    def load(self) -> None:
        cfg = self.ctx.deployment.components.denoiser
        self.denoiser = build_denoiser(self.ctx.checkpoint, cfg, self.ctx.artifacts, self.ctx.device_id)
        for shape in self.ctx.deployment.warmup:
            started = time.perf_counter()
            warm_up_denoiser(self.denoiser, shape.height, shape.width, shape.num_frames)
            logger.info("%s warm-up %s: %.2f s", self.ctx.name, shape, time.perf_counter() - started)

    def handle(self, request):
        req = GenerationRequest(**read_request_json(request, io.REQUEST_JSON))
        embeds = read_torch(request, io.PROMPT_EMBEDS)
        started = time.perf_counter()
        latents = self.denoiser(req, embeds)
        seconds = time.perf_counter() - started
        self.metrics.denoised(req.num_inference_steps, seconds)
        logger.info(
            "denoised %dx%d x %d frames, %d steps in %.2f s",
            req.width,
            req.height,
            req.num_frames,
            req.num_inference_steps,
            seconds,
        )
        return _response(output_torch(io.LATENTS.name, latents.float()))

    def finalize(self) -> None:
        close = getattr(self.denoiser, "close", None)  # a parallel plan's worker group
        if close is not None:
            close()
        super().finalize()


class VaeDecoder(_Model):
    role = "vae_decoder"

    def load(self) -> None:
        cfg = self.ctx.deployment.components.vae_decoder
        self.decoder = build_vae_decoder(self.ctx.checkpoint, cfg, self.ctx.artifacts, self.ctx.device_id)
        for shape in self.ctx.deployment.warmup:
            started = time.perf_counter()
            dims = latent_shape(self.ctx.checkpoint, shape.height, shape.width, shape.num_frames)
            self.decoder(torch.zeros(dims))
            logger.info("%s warm-up %s: %.2f s", self.ctx.name, shape, time.perf_counter() - started)

    def handle(self, request):
        latents = read_torch(request, io.LATENTS)
        frames = to_uint8_frames(self.decoder(latents))
        return _response(output(io.DECODED_FRAMES.name, frames))


class Postprocess(_Model):
    """The H.264 MP4 of the decoded frames, and the frames themselves."""

    role = "postprocess"

    def handle(self, request):
        req = GenerationRequest(**read_request_json(request, io.REQUEST_JSON))
        frames = read_inputs(request, [io.DECODED_FRAMES.name])[io.DECODED_FRAMES.name]
        return _response(
            output(io.VIDEO.name, np.array([encode_mp4(frames, req.fps)], dtype=object)), output(io.FRAMES.name, frames)
        )


def _response(*tensors):
    return pb_utils().InferenceResponse(output_tensors=list(tensors))
