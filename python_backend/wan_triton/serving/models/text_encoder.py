"""The text_encoder step: token ids to prompt embeddings on the deployment's engine."""

from __future__ import annotations

import torch

from wan_triton.components import build_text_encoder
from wan_triton.model.text import encode_tokens
from wan_triton.serving import model_io as io
from wan_triton.serving.models.base import response
from wan_triton.serving.models.device import DeviceModel
from wan_triton.serving.torch_io import output_torch
from wan_triton.serving.triton import read_inputs


class TextEncoder(DeviceModel):
    role = "text_encoder"

    def load(self) -> None:
        cfg = self.ctx.deployment.components.text_encoder
        self.engine = build_text_encoder(self.ctx.checkpoint, cfg, self.ctx.artifacts, self.ctx.device_id)

    def handle(self, request):
        inputs = read_inputs(request, [io.INPUT_IDS.name, io.ATTENTION_MASK.name])
        ids = torch.from_numpy(inputs[io.INPUT_IDS.name])
        embeds = encode_tokens(self.engine, ids, torch.from_numpy(inputs[io.ATTENTION_MASK.name]))
        # [1, rows, ...]: the leading 1 is the scheduler's batch dim (see model_io).
        return response(output_torch(io.PROMPT_EMBEDS.name, embeds[None]))
