"""Build-time FP8 weights of the experts (`precision: fp8`): one safetensors file per expert and a manifest.

    <folder>/manifest.json
    <folder>/<expert>.safetensors     blocks.<i>.<layer>.weight (float8_e4m3fn), blocks.<i>.<layer>.weight_scale (fp32)

`make build` writes them for a checkpoint with real weights when the deployment's denoiser runs at `precision: fp8`:
every layer of `kernels.fp8.FP8_BLOCK_LINEARS` in the served (fused) layout, quantized from the weight rounded to bf16
exactly as the load would quantize it, so a load from these files serves the same values as one that quantizes on the
device (configs-only random-weight checkpoints always quantize at load). The manifest records the precision, the
weight dtype, the scale method, the layer list and, per expert, a fingerprint of the source weights
(the SHA-256 of its files, and `parallel.tp_shards.fingerprint`: config, file sizes and headers, checked at every
load); a load refuses a manifest that differs from what it would compute.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from wan_triton.kernels import fp8
from wan_triton.model.checkpoint import EXPERTS, Checkpoint
from wan_triton.parallel.tp_shards import content_sha256, fingerprint

logger = logging.getLogger(__name__)

FOLDER = "fp8-e4m3"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# The served layer fused from the checkpoint's separate projections, in diffusers' `fuse_projections` order.
FUSED_SOURCES = {
    "attn1.to_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn2.to_kv": ("attn2.to_k", "attn2.to_v"),
}


def _expected() -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "precision": "fp8",
        "weight_dtype": str(fp8.E4M3).removeprefix("torch."),
        "scale_method": fp8.SCALE_METHOD,
        "layers": list(fp8.FP8_BLOCK_LINEARS),
    }


def write_fp8_weights(ckpt: Checkpoint, out: Path) -> Path:
    """Quantize every expert's block linear layers (read lazily, layer by layer) into `out`; returns `out`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {**_expected(), "source": {"checkpoint": str(ckpt.root)}, "experts": {}}
    for expert in filter(ckpt.has_expert, EXPERTS):
        paths = sorted((ckpt.root / expert).glob("*.safetensors"))
        if not paths:
            raise ValueError(f"{ckpt.root / expert}: no .safetensors weights to quantize")
        handles = [safe_open(str(path), framework="pt") for path in paths]
        where = {name: f for f in handles for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__

        def tensor(name: str, where=where, expert=expert) -> torch.Tensor:
            if name not in where:
                raise ValueError(f"{ckpt.root / expert}: no tensor {name} to quantize")
            return where[name].get_tensor(name).to(torch.bfloat16)

        tensors: dict[str, torch.Tensor] = {}
        for index in range(int(ckpt.config(expert)["num_layers"])):
            for layer in fp8.FP8_BLOCK_LINEARS:
                parts = FUSED_SOURCES.get(layer, (layer,))
                weight = torch.cat([tensor(f"blocks.{index}.{part}.weight") for part in parts])
                weight8, scale = fp8.quantize_weight(weight)
                tensors[f"blocks.{index}.{layer}.weight"] = weight8
                tensors[f"blocks.{index}.{layer}.weight_scale"] = scale
        file = out / f"{expert}.safetensors"
        save_file(tensors, str(file), metadata={"precision": "fp8", "scale_method": fp8.SCALE_METHOD})
        manifest["experts"][expert] = {
            "file": file.name,
            "source_sha256": content_sha256(ckpt, expert),
            "source_fingerprint": fingerprint(ckpt, expert),
        }
        logger.info("%s: wrote FP8 weights of %d layers to %s", expert, len(tensors) // 2, file)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def read_manifest(folder: Path, ckpt: Checkpoint) -> dict[str, Any]:
    """The folder's manifest, refused unless it was written by this code's quantization from this checkpoint."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    problems = [
        f"{key} {manifest.get(key)!r} (expected {value!r})"
        for key, value in _expected().items()
        if manifest.get(key) != value
    ]
    for expert in filter(ckpt.has_expert, EXPERTS):
        entry = manifest.get("experts", {}).get(expert)
        if entry is None:
            problems.append(f"no FP8 weights of {expert}")
        elif entry["source_fingerprint"] != fingerprint(ckpt, expert):
            problems.append(f"{expert} was quantized from other weights than {ckpt.root / expert}")
    if problems:
        raise ValueError(f"{folder / MANIFEST}: refusing the FP8 weights: " + "; ".join(problems))
    return manifest


def find_fp8_weights(artifacts: Path, ckpt: Checkpoint) -> Path | None:
    """The checked build-time FP8 weights rendered beside the model, or None (quantize at load)."""
    folder = artifacts / FOLDER
    if not (folder / MANIFEST).is_file():
        if not ckpt.random_weights:
            logger.info("%s: no build-time FP8 weights; the experts are quantized at load", folder)
        return None
    read_manifest(folder, ckpt)
    return folder


def stored_weights(folder: Path, expert: str, device: torch.device) -> fp8.StoredWeights:
    """The `kernels.fp8.quantize_module` provider of one expert's build-time FP8 weights, read onto `device`."""
    from safetensors import safe_open

    handle = safe_open(str(folder / f"{expert}.safetensors"), framework="pt", device=str(device))

    def weights(index: int, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        name = f"blocks.{index}.{layer}"
        return handle.get_tensor(f"{name}.weight"), handle.get_tensor(f"{name}.weight_scale")

    return weights
