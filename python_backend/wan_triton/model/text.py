"""The text encoder's output as diffusers' `WanPipeline` uses it: padding positions zeroed.

Tokenization is in `prompts` (no torch there, for the preprocess step)."""

from __future__ import annotations

import torch


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
