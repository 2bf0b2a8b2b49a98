"""Make a tiny random-weight Wan2.2 checkpoint in the Diffusers layout, of any of the three kinds.

Real weights cannot be downloaded here, so tests and `make run` use checkpoints with the real architectures and
tiny widths (transformers `UMT5EncoderModel`, a sentencepiece tokenizer trained offline, diffusers
`AutoencoderKLWan` and `WanTransformer3DModel`):

- `t2v` (the default; Wan2.2-T2V-A14B): `WanPipeline`, two experts switched at `boundary_ratio`, the Wan2.1 VAE.
- `i2v` (Wan2.2-I2V-A14B): `WanImageToVideoPipeline`, two experts taking noise + 4 mask + z_dim condition
  channels, no CLIP image encoder.
- `ti2v` (Wan2.2-TI2V-5B): `WanPipeline` with `expand_timesteps`, one transformer, the residual Wan2.2 VAE (16x
  spatial compression with patch size 2).

Every size is a parameter so tests can build a checkpoint that differs from the default in every dimension the
loader must read.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import sentencepiece as spm
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

logger = logging.getLogger(__name__)

_WORDS = (
    "a cat dog bird fish horse robot astronaut child woman man city forest ocean river mountain desert street "
    "kitchen garden sky sun moon rain snow fire light shadow red blue green golden silver black white small big "
    "old young fast slow walks runs flies swims dances jumps sits looks smiles plays cooks paints reads sings "
    "under over through near beside at in on the with and of while slowly quickly gently camera pans zooms "
    "close-up wide shot cinematic realistic anime style night morning sunset bright dark soft warm cold"
).split()


Kind = Literal["t2v", "i2v", "ti2v"]
KINDS: tuple[Kind, ...] = ("t2v", "i2v", "ti2v")


@dataclass
class TinyConfig:
    """Sizes of the tiny checkpoint. Defaults are the embedded default model (`t2v`); `vae_z_dim` and
    `boundary_ratio` apply to the A14B kinds, `ti2v` takes the `ti2v_*` sizes (its VAE is the Wan2.2 one)."""

    kind: Kind = "t2v"
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 12
    ffn_dim: int = 32
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 64
    vocab_pieces: int = 400
    vae_base_dim: int = 8
    vae_z_dim: int = 16
    boundary_ratio: float = 0.875
    flow_shift: float = 12.0
    num_train_timesteps: int = 1000
    ti2v_z_dim: int = 48
    ti2v_vae_base_dim: int = 8
    ti2v_decoder_base_dim: int = 12
    seed: int = 0
    corpus_seed: int = 1234
    extra: dict = field(default_factory=dict)


def _corpus(num_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(num_lines)]


def train_tokenizer(vocab_pieces: int, seed: int) -> T5Tokenizer:
    """Train a unigram sentencepiece model on generated text and wrap it as a T5 tokenizer.

    Ids follow T5's layout (<pad>=0, </s>=1, <unk>=2). transformers 5.x ignores `vocab_file`, so the pieces are
    passed as `vocab=[(piece, score), ...]`.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(3000, seed)),
        model_writer=model,
        vocab_size=vocab_pieces,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(proc.id_to_piece(i), proc.get_score(i)) for i in range(proc.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=8)


def make_pipeline(cfg: TinyConfig) -> WanPipeline | WanImageToVideoPipeline:
    """Build the tiny pipeline in memory, random weights drawn from `cfg.seed`."""
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown kind {cfg.kind!r}; expected one of {KINDS}")
    tokenizer = train_tokenizer(cfg.vocab_pieces, cfg.corpus_seed)
    torch.manual_seed(cfg.seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=cfg.text_dim,
            d_kv=cfg.text_dim // cfg.text_heads,
            d_ff=cfg.text_ff,
            num_layers=cfg.text_layers,
            num_heads=cfg.text_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        )
    ).eval()

    z_dim = cfg.ti2v_z_dim if cfg.kind == "ti2v" else cfg.vae_z_dim
    # I2V: the noisy latents, the 4-channel first-frame mask (one per frame of a latent frame) and the condition.
    in_channels = 2 * z_dim + 4 if cfg.kind == "i2v" else z_dim

    def expert() -> WanTransformer3DModel:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim,
            in_channels=in_channels,
            out_channels=z_dim,
            text_dim=cfg.text_dim,
            freq_dim=256,
            ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ).eval()

    transformer = expert()
    transformer_2 = None if cfg.kind == "ti2v" else expert()
    latents_mean = [round(random.Random(cfg.seed + i).uniform(-1, 1), 4) for i in range(z_dim)]
    latents_std = [round(random.Random(cfg.seed + 100 + i).uniform(0.8, 3), 4) for i in range(z_dim)]
    if cfg.kind == "ti2v":
        # The Wan2.2 VAE's structure (diffusers' Wan2.2-TI2V-5B config) at tiny widths.
        vae = AutoencoderKLWan(
            base_dim=cfg.ti2v_vae_base_dim,
            decoder_base_dim=cfg.ti2v_decoder_base_dim,
            z_dim=z_dim,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=latents_mean,
            latents_std=latents_std,
        ).eval()
    else:
        vae = AutoencoderKLWan(
            base_dim=cfg.vae_base_dim,
            z_dim=z_dim,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=latents_mean,
            latents_std=latents_std,
        ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=cfg.num_train_timesteps,
        flow_shift=cfg.flow_shift,
    )
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    if cfg.kind == "i2v":
        # No CLIP image encoder: Wan2.2 I2V conditions on the VAE latents alone.
        return WanImageToVideoPipeline(
            **parts,
            transformer_2=transformer_2,
            image_encoder=None,
            image_processor=None,
            boundary_ratio=cfg.boundary_ratio,
        )
    if cfg.kind == "ti2v":
        return WanPipeline(**parts, transformer_2=None, boundary_ratio=None, expand_timesteps=True)
    return WanPipeline(**parts, transformer_2=transformer_2, boundary_ratio=cfg.boundary_ratio)


def make_tiny_checkpoint(out_dir: Path, cfg: TinyConfig | None = None) -> Path:
    """Write a tiny checkpoint in the Diffusers layout (safetensors weights) and return its directory."""
    cfg = cfg or TinyConfig()
    pipe = make_pipeline(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    logger.info("wrote tiny Wan2.2 %s checkpoint to %s", cfg.kind, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--kind", choices=KINDS, default="t2v")
    parser.add_argument("--num-layers", type=int, default=TinyConfig.num_layers)
    parser.add_argument("--flow-shift", type=float, default=TinyConfig.flow_shift)
    parser.add_argument("--seed", type=int, default=TinyConfig.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_tiny_checkpoint(
        args.out_dir, TinyConfig(kind=args.kind, num_layers=args.num_layers, flow_shift=args.flow_shift, seed=args.seed)
    )


if __name__ == "__main__":
    main()
