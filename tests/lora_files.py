"""LoRA files for tests, made from a tiny checkpoint's module names with random weights large enough to change the
frames visibly, in the formats diffusers' Wan LoRA loader reads: diffusers/PEFT (with diffusers' rank/alpha
metadata in the header), original Wan / ComfyUI (`diffusion_model.` prefix, lora_down/lora_up/alpha) and LightX2V
(original keys plus `diff_b` bias deltas, `head.head.diff`, and norm `diff` keys that diffusers drops)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# The original Wan module names of each diffusers Linear the files touch (diffusers' converter maps them back).
ORIGINAL = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_v": "self_attn.v",
    "attn2.to_k": "cross_attn.k",
    "ffn.net.0.proj": "ffn.0",
}


def _config(checkpoint: Path, expert: str) -> dict:
    return json.loads((checkpoint / expert / "config.json").read_text())


def _dims(config: dict, module: str) -> tuple[int, int]:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    if module == "ffn.net.0.proj":
        return inner, config["ffn_dim"]
    return inner, inner


def _pair(g: torch.Generator, rank: int, dims: tuple[int, int], size: float) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(rank, dims[0], generator=g) * size
    up = torch.randn(dims[1], rank, generator=g) * size
    return down, up


def peft_lora(
    path: Path,
    checkpoint: Path,
    expert: str = "transformer",
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    size: float = 0.3,
) -> Path:
    """diffusers/PEFT keys written by diffusers' own `save_lora_weights`, with {r, lora_alpha} metadata."""
    from diffusers import WanPipeline

    config, g = _config(checkpoint, expert), torch.Generator().manual_seed(seed)
    layers = {}
    for block in range(config["num_layers"]):
        for module in ORIGINAL:
            down, up = _pair(g, rank, _dims(config, module), size)
            layers[f"blocks.{block}.{module}.lora_A.weight"] = down
            layers[f"blocks.{block}.{module}.lora_B.weight"] = up
    path.mkdir(parents=True, exist_ok=True)
    WanPipeline.save_lora_weights(
        path,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": sorted(ORIGINAL)},
        weight_name="adapter.safetensors",
    )
    return path / "adapter.safetensors"


def wan_lora(
    path: Path,
    checkpoint: Path,
    expert: str = "transformer",
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 1,
    size: float = 0.6,
    blocks: list[int] | None = None,
) -> Path:
    """Original Wan / ComfyUI keys: `diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `lora_up`, `alpha`."""
    config, g = _config(checkpoint, expert), torch.Generator().manual_seed(seed)
    tensors = {}
    for block in blocks if blocks is not None else range(config["num_layers"]):
        for module, original in ORIGINAL.items():
            down, up = _pair(g, rank, _dims(config, module), size)
            key = f"diffusion_model.blocks.{block}.{original}"
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def lightx2v_lora(
    path: Path, checkpoint: Path, expert: str = "transformer", rank: int = 4, seed: int = 2, size: float = 0.5
) -> Path:
    """LightX2V's keys: lora_down/lora_up without alpha, `diff_b` bias deltas, `head.head.diff` (a full weight
    delta of the output projection) with its `diff_b`, and zero norm `diff` keys that diffusers drops."""
    config, g = _config(checkpoint, expert), torch.Generator().manual_seed(seed)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out = config["out_channels"] * int(np.prod(config["patch_size"]))
    tensors = {}
    for block in range(config["num_layers"]):
        for module, original in ORIGINAL.items():
            dims = _dims(config, module)
            down, up = _pair(g, rank, dims, size)
            key = f"diffusion_model.blocks.{block}.{original}"
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.diff_b"] = torch.randn(dims[1], generator=g) * size
        tensors[f"diffusion_model.blocks.{block}.norm3.diff"] = torch.zeros(inner)
    tensors["diffusion_model.head.head.diff"] = torch.randn(out, inner, generator=g) * size * 0.2
    tensors["diffusion_model.head.head.diff_b"] = torch.randn(out, generator=g) * size * 0.2
    save_file(tensors, str(path))
    return path


def reference_frames(checkpoint: Path, loras=(), solver: dict | None = None, **call) -> np.ndarray:
    """diffusers' WanPipeline with the LoRAs loaded its own way: `load_lora_weights(file, adapter_name=...)` (into
    `transformer_2` with `load_into_transformer_2=True`; `both` loads the file once per expert), `set_adapters`
    with the scales, and the solver swapped for `solver` ({"name": class, **config overrides}); uint8 frames.

    loras: (path, scale, expert) triples."""
    import diffusers
    from diffusers import WanPipeline

    seed = call.pop("seed")
    pipe = WanPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    names, scales = [], []
    for index, (path, scale, expert) in enumerate(loras):
        for target in ("transformer", "transformer_2") if expert == "both" else (expert,):
            name = f"lora{index}_{target}"
            pipe.load_lora_weights(str(path), adapter_name=name, load_into_transformer_2=target == "transformer_2")
            names.append(name)
            scales.append(scale)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
    if solver is not None:
        overrides = {k: v for k, v in solver.items() if k != "name"}
        pipe.scheduler = getattr(diffusers, solver["name"]).from_config(pipe.scheduler.config, **overrides)
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call).frames[0]
    return (out * 255).round().astype(np.uint8)
