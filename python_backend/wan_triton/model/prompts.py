"""Prompt cleaning and tokenization exactly as diffusers' `WanPipeline` does it, without torch.

`prompt_clean` is diffusers' `pipeline_wan.prompt_clean` (ftfy, HTML unescape, whitespace collapse)
restated here because importing it loads diffusers and torch, which the preprocess step otherwise does without;
tests/unit/test_prompts.py checks the two agree. Prompts are padded or truncated to the text length (512 tokens); a
prompt within the deployment's character limit is never rejected for its token count.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import ftfy
import numpy as np
import regex

from wan_triton.config.request import GenerationRequest
from wan_triton.model.checkpoint import MAX_SEQUENCE_LENGTH

# diffusers matches whitespace with the `regex` package, whose \s is Unicode's White_Space (Python's `re` differs).
_WHITESPACE = regex.compile(r"\s+")


def prompt_clean(text: str) -> str:
    """diffusers' `prompt_clean`: ftfy's `fix_text` (ftfy is a dependency, so diffusers uses it too), HTML unescaped
    twice, whitespace collapsed."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def prompts_for(request: GenerationRequest) -> list[str]:
    """The prompts to encode: the negative prompt only when guidance is on, as in the reference."""
    return [request.prompt, request.negative_prompt] if request.do_classifier_free_guidance else [request.prompt]


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
