"""The preprocess step: request validation, tokenization and the condition image, on the host without torch."""

from __future__ import annotations

import numpy as np

from wan_triton.config.request import request_json
from wan_triton.model.prompts import PromptTokenizer, prompts_for
from wan_triton.serving import model_io as io
from wan_triton.serving.models.base import StepModel, response
from wan_triton.serving.request_input import request_image, validate_for
from wan_triton.serving.triton import output, read_inputs


class Preprocess(StepModel):
    """Validate the request, fill defaults, tokenize the prompt (and negative prompt when guidance is on)."""

    role = "preprocess"

    def load(self) -> None:
        self.tokenizer = PromptTokenizer(self.ctx.checkpoint.load_tokenizer())

    def handle(self, request):
        inputs = read_inputs(request, [t.name for t in io.REQUEST_INPUTS])
        req = validate_for(inputs, self.ctx.deployment, self.ctx.checkpoint)
        pixels = request_image(req, self.ctx.deployment)
        tokens = self.tokenizer(prompts_for(req))
        return response(
            output(io.REQUEST_JSON.name, np.array([[request_json(req)]], dtype=object)),
            output(io.INPUT_IDS.name, tokens.input_ids),
            output(io.ATTENTION_MASK.name, tokens.attention_mask),
            output(io.USED_SEED.name, np.array([req.seed], dtype=np.int64)),
            output(io.CONDITION_IMAGE.name, pixels[None]),
        )
