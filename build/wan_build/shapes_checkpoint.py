"""Write a configs-only Wan2.2 checkpoint (the real shapes, no weights) for benchmarks: T2V-A14B (the default),
I2V-A14B or TI2V-5B.

The folder has the Diffusers layout with every component's real config (A14B experts or the 5B transformer,
UMT5-XXL text encoder, the Wan2.1 VAE or the Wan2.2 one, the official UniPC settings) and a `RANDOM_WEIGHTS`
marker; loaders then build the modules with random weights directly on the device (see
`wan_triton.model.random_init`). The tokenizer is the small offline-trained one: token ids only index the real-size
embedding table, and their values do not change the work.

    python -m wan_build.shapes_checkpoint OUT_DIR [--kind t2v|i2v|ti2v]

The VAE's latent normalization (`latents_mean`/`latents_std`) of the Wan2.2 VAE is written as 0/1: with random
weights it only has to have the right length.
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
# Wan2.2-I2V-A14B: the A14B expert taking 16 noise + 4 mask + 16 condition channels; boundary 0.9, flow shift 5.
I2V_A14B_TRANSFORMER = {**A14B_TRANSFORMER, "in_channels": 36}
I2V_BOUNDARY_RATIO = 0.9
# Wan2.2-TI2V-5B: dim 3072 (24 heads x 128), 30 layers, FFN 14336, 48 latent channels; flow shift 5.
TI2V_5B_TRANSFORMER = {
    **A14B_TRANSFORMER,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "in_channels": 48,
    "out_channels": 48,
    "ffn_dim": 14336,
    "num_layers": 30,
}
# The Wan2.2 VAE: residual blocks, 16x spatial compression (8x by the convolutions, 2x by the patch), z_dim 48.
WAN22_VAE = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)
KINDS = ("t2v", "i2v", "ti2v")


def make_shapes_checkpoint(out_dir: Path, kind: str = "t2v") -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    transformer = {"t2v": A14B_TRANSFORMER, "i2v": I2V_A14B_TRANSFORMER, "ti2v": TI2V_5B_TRANSFORMER}[kind]
    experts = ("transformer",) if kind == "ti2v" else ("transformer", "transformer_2")
    with torch.device("meta"):
        expert = WanTransformer3DModel(**transformer)
        # The Wan2.1 VAE (AutoencoderKLWan's defaults) for the A14B kinds, the Wan2.2 one for TI2V-5B.
        vae = AutoencoderKLWan(**WAN22_VAE) if kind == "ti2v" else AutoencoderKLWan()
    for name in experts:
        expert.save_config(out_dir / name)
    vae.save_config(out_dir / "vae")
    UMT5Config(**UMT5_XXL).save_pretrained(out_dir / "text_encoder")
    flow_shift = SCHEDULER["flow_shift"] if kind == "t2v" else 5.0
    UniPCMultistepScheduler(**{**SCHEDULER, "flow_shift": flow_shift}).save_config(out_dir / "scheduler")
    train_tokenizer(400, seed=1234).save_pretrained(out_dir / "tokenizer")
    index = {
        "_class_name": "WanImageToVideoPipeline" if kind == "i2v" else "WanPipeline",
        "boundary_ratio": {"t2v": BOUNDARY_RATIO, "i2v": I2V_BOUNDARY_RATIO, "ti2v": None}[kind],
        "expand_timesteps": kind == "ti2v",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if len(experts) == 2 else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if kind == "i2v":
        index |= {"image_encoder": [None, None], "image_processor": [None, None]}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (out_dir / MARKER).write_text(
        "configs only: modules are built with random weights (benchmarks)\n", encoding="utf-8"
    )
    logger.info("wrote configs-only Wan2.2 %s checkpoint to %s", kind, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--kind", choices=KINDS, default="t2v", help="T2V-A14B, I2V-A14B or TI2V-5B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_shapes_checkpoint(args.out_dir, args.kind)


if __name__ == "__main__":
    main()
