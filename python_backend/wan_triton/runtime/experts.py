"""The denoiser's experts as the torch engine serves them: loaded to the device, attention kernel installed, blocks
compiled, CUDA graphs around the forward, and both experts behind one device module when they are swapped."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from wan_triton.config.deployment import ComponentConfig
from wan_triton.kernels import attention, fp8
from wan_triton.model.checkpoint import EXPERTS, Checkpoint
from wan_triton.runtime import fp8_weights
from wan_triton.runtime.engines.cuda_graph import CudaGraphEngine
from wan_triton.runtime.engines.torch_engine import denoiser_engine
from wan_triton.runtime.residency import ExpertSwapper, SwappedExpert

logger = logging.getLogger(__name__)

# Request shapes compiled per expert before dynamo stops compiling new ones (it then runs them eagerly).
COMPILED_SHAPES_LIMIT = 64


def torch_expert(
    ckpt: Checkpoint,
    name: str,
    cfg: ComponentConfig,
    device: torch.device,
    dtype: torch.dtype,
    fp8_folder: Path | None = None,
):
    """An expert as served: loaded straight to `device` in `dtype`, attention kernel installed (and projections
    fused), its block linear layers and self-attention in FP8 at `precision: fp8` (the weights from the build-time
    `fp8_folder` (runtime.fp8_weights), else quantized here on the device), blocks compiled when the deployment
    asks."""
    if cfg.precision == "fp8" and (why := fp8.supported(device)) is not None:
        raise ValueError(why)  # before the load: the expert would not run anyway
    module = ckpt.load_transformer(name, dtype, str(device))
    if cfg.precision == "fp8":
        stored = None if fp8_folder is None else fp8_weights.stored_weights(fp8_folder, name, device)
        chosen = fp8.install(module, cfg.attention, device, stored=stored)
    else:
        chosen = attention.install(module, cfg.attention, device)
    if cfg.compile_blocks:
        compile_expert_blocks(module, parallel=False)
    return module, chosen


# inductor options for blocks whose collectives are started ahead of their waits (see compile_expert_blocks).
OVERLAP_COMPILE_OPTIONS = {"reorder_for_peak_memory": False}


def compile_expert_blocks(module: torch.nn.Module, parallel: bool) -> None:
    """Regional torch.compile of every transformer block, as served on one GPU and on a parallel plan's ranks.

    One compiled variant per request shape (static shapes keep the fastest kernels). dynamo's default of 8 variants
    per code object would silently fall back to eager on a server that has seen 9 shapes; each deployment bounds its
    shapes through `limits`, so allow as many as a busy server plausibly sees. A parallel rank compiles without
    `fullgraph`: a collective dynamo cannot trace becomes a graph break, not a load failure (dynamo traces ours in as
    functional collectives, no break seen on CPU).

    Where the Ulysses exchanges run in head groups, started ahead of their waits, inductor's reordering for peak
    memory is off: on `ulysses.attend_head_groups` compiled alone it moved each wait up to its start and the next
    group's starts after the attention (the generated code, on CPU), which serialises the exchanges again; without
    it the calls keep the order they are written in (tests/multiprocess/test_ulysses_head_groups.py)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES_LIMIT)
    overlapped = any(getattr(p, "head_groups", 1) > 1 for p in module.attn_processors.values())
    options = OVERLAP_COMPILE_OPTIONS if parallel and overlapped else None
    module.compile_repeated_blocks(fullgraph=not parallel, dynamic=False, options=options)


def torch_engines(module, device: torch.device, dtype: torch.dtype, cuda_graphs: bool, parallel: bool = False):
    """(eager engine, CUDA-graph engine over it or None without graphs). A parallel rank's graph engine captures
    the forward's collectives with it and never falls back to eager on its own: its peers would replay while it ran
    eagerly, which NCCL does not allow (see engines.cuda_graph)."""
    eager = denoiser_engine(module, device, dtype)
    if not cuda_graphs:
        return eager, None
    return eager, CudaGraphEngine(eager, eager_fallback=not parallel)


def swapped_experts(
    ckpt: Checkpoint, cfg: ComponentConfig, device: torch.device, dtype: torch.dtype, fp8_folder: Path | None = None
):
    """Both experts in pinned host memory, one device module (runtime.residency)."""

    def host_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        # A copy, never a view (the device module's storage is overwritten with the other expert's weights), made
        # straight into pinned memory on CUDA so that side-stream copies are asynchronous.
        pin = device.type == "cuda"
        return {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=pin).copy_(p) for n, p in module.named_parameters()}

    first, chosen = torch_expert(ckpt, EXPERTS[0], cfg, device, dtype, fp8_folder)
    host_states = {EXPERTS[0]: host_copy(first)}
    for name in EXPERTS[1:]:
        # Straight to host memory (from disk, or random for a configs-only benchmark checkpoint): the device never
        # holds two experts, not even while loading, when other models of the server share it.
        other = ckpt.load_transformer(name, dtype, "cpu")
        if chosen != attention.AttentionBackend.REFERENCE:
            attention.fuse_projections(other)  # the device module's parameter layout, fused on the host
        if cfg.precision == "fp8" and fp8_folder is not None:
            fp8.quantize_module(other, stored=fp8_weights.stored_weights(fp8_folder, name, torch.device("cpu")))
        elif cfg.precision == "fp8":
            fp8.quantize_module(other, work_device=device)  # layer by layer through the device, kept on the host
        host_states[name] = host_copy(other)
        del other
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        logger.info(
            "expert swapping: %.1f GB of device memory in use after loading", torch.cuda.memory_allocated(device) / 1e9
        )
    swapper = ExpertSwapper(first, host_states, resident=EXPERTS[0])
    eager, graphed = torch_engines(first, device, dtype, cfg.cuda_graphs)
    return {name: SwappedExpert(name, swapper, eager, graphed) for name in EXPERTS}, swapper
