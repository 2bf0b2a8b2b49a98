"""Write a configs-only Wan2.2-T2V-A14B checkpoint (the real shapes, no weights) for benchmarks.

The folder has the Diffusers layout with every component's real config (A14B experts, UMT5-XXL text encoder, Wan
VAE, the official UniPC settings) and a `RANDOM_WEIGHTS` marker; loaders then build the modules with random
weights directly on the device (see `wan_triton.model.random_init`). The tokenizer is the small offline-trained one:
token ids only index the real-size embedding table, and their values do not change the work.

    python -m wan_build.shapes_checkpoint OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import UMT5Config

from wan_triton.model.random_init import MARKER

from .tiny_model import train_tokenizer

logger = logging.getLogger(__name__)

# Wan2.2-T2V-A14B expert: dim 5120, 40 layers, 40 heads x 128, FFN 13824 (14.29 B parameters).
A14B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    tie_word_embeddings=False,
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=12.0,
    solver_order=2,
    solver_type="bh2",
    lower_order_final=True,
)
BOUNDARY_RATIO = 0.875


def make_shapes_checkpoint(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        expert = WanTransformer3DModel(**A14B_TRANSFORMER)
        vae = AutoencoderKLWan()  # the defaults are the Wan2.1 VAE that A14B uses
    for name in ("transformer", "transformer_2"):
        expert.save_config(out_dir / name)
    vae.save_config(out_dir / "vae")
    UMT5Config(**UMT5_XXL).save_pretrained(out_dir / "text_encoder")
    UniPCMultistepScheduler(**SCHEDULER).save_config(out_dir / "scheduler")
    train_tokenizer(400, seed=1234).save_pretrained(out_dir / "tokenizer")
    index = {
        "_class_name": "WanPipeline",
        "boundary_ratio": BOUNDARY_RATIO,
        "expand_timesteps": False,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (out_dir / MARKER).write_text(
        "configs only: modules are built with random weights (benchmarks)\n", encoding="utf-8"
    )
    logger.info("wrote configs-only A14B checkpoint to %s", out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_shapes_checkpoint(args.out_dir)


if __name__ == "__main__":
    main()
