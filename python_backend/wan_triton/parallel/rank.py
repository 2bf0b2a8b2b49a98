"""What one rank of a worker group runs: both experts sharded for its place in the plan, in a Denoiser."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import EXPERTS, Checkpoint
from ..components import DTYPES
from ..denoise import Denoiser
from ..deployment import ComponentConfig
from ..engines.base import EngineKind
from .cfg import CfgParallel
from .groups import PlanGroups
from .model import parallelize

logger = logging.getLogger(__name__)


def build_rank_denoiser(
    ckpt: Checkpoint, cfg: ComponentConfig, groups: PlanGroups, device: torch.device, shards: Path | None = None
) -> Denoiser:
    """This rank's Denoiser. `shards`: a build-time TP shard folder (wan_build.shards) to load only this rank's
    weights from; without it the whole expert is loaded and cut here."""
    from ..engines.torch_engine import denoiser_engine

    if cfg.engine != EngineKind.TORCH:
        raise ValueError(f"a parallel plan needs the torch engine, not {cfg.engine.value}")
    dtype = DTYPES[cfg.precision]
    experts = {}
    for name in EXPERTS:
        if shards is not None and groups.plan.tp > 1:
            from .shards import load_rank_shard

            module = load_rank_shard(ckpt, name, shards, groups, dtype, device)
        else:
            module = ckpt.load_transformer(name, dtype, str(device))
        parallelize(module, groups, cfg.attention, device)
        if cfg.compile_blocks:
            # Not fullgraph: a collective dynamo cannot trace becomes a graph break, not a load failure. dynamo
            # traces ours in as functional collectives (no break seen on CPU), and on one H100 with a fake
            # process group the compiled ranks computed 1/N of the 1-GPU step (benchmarks/RESULTS.md); with
            # NCCL on several GPUs this is still unmeasured.
            module.compile_repeated_blocks(fullgraph=False, dynamic=False)
        engine = denoiser_engine(module, device, dtype)
        if cfg.cuda_graphs:
            from ..engines.cuda_graph import CudaGraphEngine

            # The forward's collectives are captured with it; a failed capture fails the request rather than
            # running eagerly while the peers replay (see engines.cuda_graph).
            engine = CudaGraphEngine(engine, eager_fallback=False)
        experts[name] = engine
    cfg_parallel = None if groups.cfg is None else CfgParallel(groups.cfg, groups.coords.cfg)
    return Denoiser(ckpt=ckpt, experts=experts, device=device, dtype=dtype, cfg_parallel=cfg_parallel)
