"""Random-weight LoRA files of a checkpoint's expert shapes, for GPU measurements of LoRA deployments.

    python -m wan_build.random_lora CKPT_DIR OUT.safetensors [--expert transformer] [--rank 64] [--seed 0]

The file has the layout of the published Wan2.2 distill LoRAs (original Wan keys with a `diffusion_model.` prefix,
`lora_down`/`lora_up` and an `alpha` per layer, float16) on every attention projection (self and cross: q, k, v,
o) and both FFN layers of every block, at `--rank`. Its weights are random: the frames it gives are noise, and only
the cost of building and serving with it is meaningful. Small weights keep bf16 activations finite.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

# Original Wan module name -> (input width, output width) as functions of (inner dim, FFN dim).
_LAYERS = {
    **{f"self_attn.{p}": lambda d, f: (d, d) for p in "qkvo"},
    **{f"cross_attn.{p}": lambda d, f: (d, d) for p in "qkvo"},
    "ffn.0": lambda d, f: (d, f),
    "ffn.2": lambda d, f: (f, d),
}


def make_random_lora(config: dict, out: Path, rank: int = 64, seed: int = 0, std: float = 0.01) -> Path:
    """Write a random LoRA for a WanTransformer3DModel `config` to `out`; returns `out`."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config["ffn_dim"]
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for block in range(config["num_layers"]):
        for name, dims in _LAYERS.items():
            d_in, d_out = dims(inner, ffn)
            key = f"diffusion_model.blocks.{block}.{name}"
            tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, d_in, generator=g) * std).half()
            tensors[f"{key}.lora_up.weight"] = (torch.randn(d_out, rank, generator=g) * std).half()
            tensors[f"{key}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    logger.info("%s: random rank-%d LoRA, %d tensors, %.0f MB", out, rank, len(tensors), out.stat().st_size / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wan_build.random_lora", description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint in the Diffusers layout (a shapes checkpoint will do)"
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--expert", default="transformer", choices=["transformer", "transformer_2"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = json.loads((args.checkpoint / args.expert / "config.json").read_text(encoding="utf-8"))
    make_random_lora(config, args.out, args.rank, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
