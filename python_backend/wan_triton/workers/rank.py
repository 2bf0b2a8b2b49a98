"""What one rank of a worker group runs: the experts sharded for its place in the plan, in a Denoiser (with a VAE
encoder of its own where requests carry condition images)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from wan_triton.config.deployment import ComponentConfig, EngineKind
from wan_triton.config.precision import DTYPES
from wan_triton.model.checkpoint import EXPERTS, Checkpoint
from wan_triton.model.denoise import Denoiser
from wan_triton.model.vae import VaeEncoder, torch_vae_encode_fn
from wan_triton.parallel.cfg import CfgParallel
from wan_triton.parallel.process_groups import PlanGroups
from wan_triton.parallel.sharding import install_fp8, parallelize
from wan_triton.parallel.tp_shards import load_rank_shard
from wan_triton.runtime import fp8_weights
from wan_triton.runtime.experts import compile_expert_blocks, torch_engines

logger = logging.getLogger(__name__)


def build_rank_denoiser(
    ckpt: Checkpoint,
    cfg: ComponentConfig,
    groups: PlanGroups,
    device: torch.device,
    shards: Path | None = None,
    fp8_folder: Path | None = None,
) -> Denoiser:
    """This rank's Denoiser. `shards`: a build-time TP shard folder (wan_build.shards) to load only this rank's
    weights from; without it the whole expert is loaded and cut here. At `precision: fp8`, `fp8_folder`: the
    build-time FP8 weights (runtime.fp8_weights), whole layers, which plans without tp take as they are; with tp,
    or without the folder, each rank quantizes its own part at load."""
    if cfg.engine != EngineKind.TORCH:
        raise ValueError(f"a parallel plan needs the torch engine, not {cfg.engine.value}")
    dtype = DTYPES[cfg.precision]
    experts = {}
    for name in filter(ckpt.has_expert, EXPERTS):
        if shards is not None and groups.plan.tp > 1:
            module = load_rank_shard(ckpt, name, shards, groups, dtype, device)
        else:
            module = ckpt.load_transformer(name, dtype, str(device))
        chosen = parallelize(module, groups, cfg.attention, device, cfg.ulysses_head_groups)
        if cfg.precision == "fp8":
            whole_layers = fp8_folder is not None and groups.plan.tp == 1
            stored = fp8_weights.stored_weights(fp8_folder, name, device) if whole_layers else None
            install_fp8(module, groups, chosen, device, stored)
        if cfg.compile_blocks:
            # Each compiled rank computes its 1/N of the 1-GPU step (benchmarks/RESULTS.md, Parallel).
            compile_expert_blocks(module, parallel=True)
        eager, graphed = torch_engines(module, device, dtype, cfg.cuda_graphs, parallel=True)
        experts[name] = graphed or eager
    cfg_parallel = None if groups.cfg is None else CfgParallel(groups.cfg, groups.coords.cfg)
    encoder = None
    if ckpt.image_input != "none":
        # Every rank encodes the request's image itself (the same float32 encode, so the same condition on every
        # rank), instead of receiving latents from one of them.
        encode = torch_vae_encode_fn(ckpt.load_vae(torch.float32, str(device)))
        encoder = VaeEncoder(ckpt, encode, device, torch.float32)
    return Denoiser(
        ckpt=ckpt, experts=experts, device=device, dtype=dtype, cfg_parallel=cfg_parallel, vae_encoder=encoder
    )
