"""The whole generation path in one process: tokenize, encode (text, and a condition image), denoise, decode.

The Triton models run these same stages one model each; this in-process form serves offline reproduction,
benchmarks and fast tests of the numerics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wan_triton.components import build_denoiser, build_text_encoder, build_vae_decoder
from wan_triton.config.deployment import Deployment
from wan_triton.config.request import GenerationRequest
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.denoise import BatchItem, Denoiser, StepCallback
from wan_triton.model.engine import Engine
from wan_triton.model.prompts import PromptTokenizer, prompts_for
from wan_triton.model.text import encode_tokens
from wan_triton.model.vae import VaeDecoder
from wan_triton.workers.supervisor import VaeWorkerGroup

logger = logging.getLogger(__name__)


def encode_prompts(tokenizer: PromptTokenizer, engine: Engine, prompts: list[str]) -> torch.Tensor:
    tokens = tokenizer(prompts)
    return encode_tokens(engine, torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask))


@dataclass
class LocalPipeline:
    tokenizer: PromptTokenizer
    text_encoder: Engine
    denoiser: Denoiser
    vae_decoder: VaeDecoder | VaeWorkerGroup  # a split decode's worker group (deployment split_width)

    @classmethod
    def load(cls, ckpt: Checkpoint, deployment: Deployment, artifacts: Path) -> LocalPipeline:
        c = deployment.components
        return cls(
            tokenizer=PromptTokenizer(ckpt.load_tokenizer()),
            text_encoder=build_text_encoder(ckpt, c.text_encoder, artifacts),
            denoiser=build_denoiser(ckpt, c.denoiser, artifacts, vae_encoder=c.vae_encoder),
            vae_decoder=build_vae_decoder(ckpt, c.vae_decoder, artifacts),
        )

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        condition_image: np.ndarray | None = None,
    ) -> np.ndarray:
        """Returns frames, uint8 [num_frames, height, width, 3]. `condition_image`: uint8 [height, width, 3] at the
        request's size (image-to-video), or None."""
        embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts_for(request))
        item = BatchItem(request, embeds, on_step, condition_image=condition_image)
        (latents,) = self.denoiser.run_batch([item])
        if isinstance(latents, BaseException):
            raise latents
        return self.vae_decoder.frames(latents)
