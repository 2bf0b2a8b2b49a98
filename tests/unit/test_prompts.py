"""Prompt cleaning and tokenization (wan_triton.model.prompts) against diffusers' and transformers' own: the
restated `prompt_clean` and the tokenizer class read from the checkpoint give what the reference gives."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers.pipelines.wan.pipeline_wan import prompt_clean as reference_clean
from transformers import AutoTokenizer

from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.prompts import PromptTokenizer, prompt_clean

PROMPTS = [
    "a small robot dances in the rain, close-up",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\x0band\x0cfeeds",
    "unicode\u00a0no-break\u2003em\u3000ideographic\u2028line\u0085next spaces",
    "file\x1cseparators\x1dare\x1enot\x1fwhite space in Unicode",
    "html &amp;amp; double-escaped &lt;b&gt; &quot;quotes&quot; &#39;x&#39; &nbsp;",
    "mojibake: cafÃ© naÃ¯ve â€œquotedâ€\x9d",
    "emoji 🤖 and CJK 日本語 and combining e\u0301",
    "",
    "   ",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_clean_is_diffusers(prompt):
    assert prompt_clean(prompt) == reference_clean(prompt)


def test_tokenizer_is_the_one_auto_tokenizer_picks(other_checkpoint):
    ckpt = Checkpoint.open(other_checkpoint)
    ours, reference = ckpt.load_tokenizer(), AutoTokenizer.from_pretrained(other_checkpoint / "tokenizer")
    assert type(ours) is type(reference)
    tokens = PromptTokenizer(ours)(PROMPTS)
    expected = reference(
        [reference_clean(p) for p in PROMPTS],
        padding="max_length",
        max_length=512,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    np.testing.assert_array_equal(tokens.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(tokens.attention_mask, expected["attention_mask"])
    assert tokens.attention_mask.sum() > len(PROMPTS)  # real tokens, not just padding
