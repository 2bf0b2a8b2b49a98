"""Prompt cleaning and tokenization exactly as diffusers' `WanPipeline` does it.

The cleaning function is diffusers' own (`prompt_clean`: ftfy when installed, HTML unescape, whitespace
collapse), so served prompts and reference prompts cannot drift apart. Prompts are padded or truncated to the
text length (512 tokens); a prompt within the deployment's character limit is never rejected for its token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from wan_triton.model.checkpoint import MAX_SEQUENCE_LENGTH


@dataclass(frozen=True)
class TokenizedPrompts:
    input_ids: np.ndarray  # int64 [num_prompts, text_len]
    attention_mask: np.ndarray  # int64 [num_prompts, text_len]


class PromptTokenizer:
    def __init__(self, tokenizer, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length

    def __call__(self, prompts: list[str]) -> TokenizedPrompts:
        encoded = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        return TokenizedPrompts(
            input_ids=encoded["input_ids"].astype(np.int64), attention_mask=encoded["attention_mask"].astype(np.int64)
        )


def zero_pad_past_length(embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Zero every position past each prompt's token count, as `WanPipeline._get_t5_prompt_embeds` does.

    Args:
        embeds: [num_prompts, text_len, text_dim] encoder output.
        attention_mask: [num_prompts, text_len], 1 for real tokens.
    """
    seq_lens = attention_mask.gt(0).sum(dim=1)
    positions = torch.arange(embeds.shape[1], device=embeds.device)
    keep = positions[None, :] < seq_lens[:, None].to(embeds.device)
    return embeds * keep[..., None].to(embeds.dtype)


def encode_tokens(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run the text-encoder engine and zero past each prompt's length: [num_prompts, text_len, text_dim] float32."""
    hidden = engine.run({"input_ids": input_ids, "attention_mask": attention_mask})["last_hidden_state"]
    return zero_pad_past_length(hidden.float(), attention_mask)
