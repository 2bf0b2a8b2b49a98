"""Build each component (text encoder, denoiser experts, VAE decoder) with the engine its config names."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import EXPERTS, Checkpoint
from .denoise import Denoiser, warm_up
from .deployment import ComponentConfig
from .engines.base import Engine, EngineKind
from .vae import VaeDecoder, torch_vae_decode_fn

if TYPE_CHECKING:
    from .parallel.group import VaeWorkerGroup, WorkerGroup

logger = logging.getLogger(__name__)

# Request shapes compiled per expert before dynamo stops compiling new ones (it then runs them eagerly).
COMPILED_SHAPES_LIMIT = 64

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(cfg: ComponentConfig, device_id: int) -> torch.device:
    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("the deployment asks for device 'cuda' but no CUDA device is available")
    return torch.device("cuda", device_id)


def _onnx_engine(path: Path, cfg: ComponentConfig) -> Engine:
    from .engines.onnxruntime_engine import OnnxRuntimeEngine

    if cfg.precision != "float32":
        raise ValueError(f"the onnxruntime engine runs float32 graphs; precision {cfg.precision!r} is not supported")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported graph missing; run `make build`")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cfg.device == "cuda" else ["CPUExecutionProvider"]
    return OnnxRuntimeEngine(path, providers=providers)


def _reserved_tensorrt(component: str) -> Engine:
    from .engines.tensorrt_engine import TensorRTEngine

    return TensorRTEngine(component)


def build_text_encoder(ckpt: Checkpoint, cfg: ComponentConfig, artifacts: Path, device_id: int = 0) -> Engine:
    match cfg.engine:
        case EngineKind.TORCH:
            from .engines.torch_engine import text_encoder_engine

            device, dtype = _device(cfg, device_id), DTYPES[cfg.precision]
            return text_encoder_engine(ckpt.load_text_encoder(dtype, str(device)), device, dtype)
        case EngineKind.ONNXRUNTIME:
            return _onnx_engine(artifacts / "text_encoder.onnx", cfg)
        case EngineKind.TENSORRT:
            return _reserved_tensorrt("text_encoder")
    raise ValueError(f"unknown engine {cfg.engine}")


def _torch_expert(ckpt: Checkpoint, name: str, cfg: ComponentConfig, device: torch.device, dtype: torch.dtype):
    """An expert as served: loaded straight to `device` in `dtype`, attention kernel installed (and projections
    fused), blocks compiled when the deployment asks."""
    from . import attention

    module = ckpt.load_transformer(name, dtype, str(device))
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
    it the calls keep the order they are written in (tests/test_ulysses_head_groups.py)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES_LIMIT)
    overlapped = any(getattr(p, "head_groups", 1) > 1 for p in module.attn_processors.values())
    options = OVERLAP_COMPILE_OPTIONS if parallel and overlapped else None
    module.compile_repeated_blocks(fullgraph=not parallel, dynamic=False, options=options)


def torch_engines(module, device: torch.device, dtype: torch.dtype, cuda_graphs: bool, parallel: bool = False):
    """(eager engine, CUDA-graph engine over it or None without graphs). A parallel rank's graph engine captures
    the forward's collectives with it and never falls back to eager on its own: its peers would replay while it ran
    eagerly, which NCCL does not allow (see engines.cuda_graph)."""
    from .engines.torch_engine import denoiser_engine

    eager = denoiser_engine(module, device, dtype)
    if not cuda_graphs:
        return eager, None
    from .engines.cuda_graph import CudaGraphEngine

    return eager, CudaGraphEngine(eager, eager_fallback=not parallel)


def _swapped_experts(ckpt: Checkpoint, cfg: ComponentConfig, device: torch.device, dtype: torch.dtype):
    """Both experts in pinned host memory, one device module (wan_triton.residency)."""
    from . import attention
    from .residency import ExpertSwapper, SwappedExpert

    def host_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        # A copy, never a view (the device module's storage is overwritten with the other expert's weights), made
        # straight into pinned memory on CUDA so that side-stream copies are asynchronous.
        pin = device.type == "cuda"
        return {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=pin).copy_(p) for n, p in module.named_parameters()}

    first, chosen = _torch_expert(ckpt, EXPERTS[0], cfg, device, dtype)
    host_states = {EXPERTS[0]: host_copy(first)}
    for name in EXPERTS[1:]:
        # Straight to host memory (from disk, or random for a configs-only benchmark checkpoint): the device never
        # holds two experts, not even while loading, when other models of the server share it.
        other = ckpt.load_transformer(name, dtype, "cpu")
        if chosen != attention.AttentionBackend.REFERENCE:
            attention.fuse_projections(other)  # the device module's parameter layout, fused on the host
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


def build_denoiser(
    ckpt: Checkpoint, cfg: ComponentConfig, artifacts: Path, device_id: int = 0
) -> Denoiser | WorkerGroup:
    """The denoising loop with both experts. With a parallel plan above 1x1x1, a started worker group of that many
    processes (one GPU each from `device_id` on, on cuda), which is called like a Denoiser."""
    if not cfg.parallel.is_single:
        return _worker_group(ckpt, cfg, artifacts, device_id)
    device, dtype = _device(cfg, device_id), DTYPES[cfg.precision]
    experts: dict[str, Engine] = {}
    swapper = None
    match cfg.engine:
        case EngineKind.TORCH:
            from .residency import choose_residency

            residency = choose_residency(cfg.expert_residency, ckpt.expert_weight_bytes(dtype), device)
            logger.info("denoiser experts: %s", residency)
            if residency == "swap" and all(map(ckpt.has_expert, EXPERTS)):
                experts, swapper = _swapped_experts(ckpt, cfg, device, dtype)
            else:
                for name in filter(ckpt.has_expert, EXPERTS):
                    module, _ = _torch_expert(ckpt, name, cfg, device, dtype)
                    eager, graphed = torch_engines(module, device, dtype, cfg.cuda_graphs)
                    experts[name] = graphed or eager
        case EngineKind.ONNXRUNTIME:
            for name in EXPERTS:
                experts[name] = _onnx_engine(artifacts / f"{name}.onnx", cfg)
            device, dtype = torch.device("cpu"), torch.float32  # ORT takes host tensors
        case EngineKind.TENSORRT:
            for name in EXPERTS:
                experts[name] = _reserved_tensorrt(name)
    return Denoiser(ckpt=ckpt, experts=experts, device=device, dtype=dtype, swapper=swapper)


def _group_device_ids(cfg: ComponentConfig, device_id: int, world: int, what: str) -> tuple[int, ...]:
    """GPUs device_id .. device_id + world - 1 on cuda (checked to exist); none on cpu."""
    if cfg.device != "cuda":
        return ()
    if not torch.cuda.is_available() or torch.cuda.device_count() < device_id + world:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise RuntimeError(f"{what} needs GPUs {device_id}..{device_id + world - 1}; {available} found")
    return tuple(range(device_id, device_id + world))


def _worker_group(ckpt: Checkpoint, cfg: ComponentConfig, artifacts: Path, device_id: int) -> WorkerGroup:
    from .parallel.group import WorkerGroup
    from .parallel.shards import find_shards

    device_ids = _group_device_ids(cfg, device_id, cfg.parallel.world_size, f"plan {cfg.parallel}")
    group = WorkerGroup(ckpt, cfg, device_ids, shards=find_shards(artifacts, ckpt, cfg.parallel, cfg.precision))
    group.start()
    return group


def warm_up_denoiser(denoiser: Denoiser | WorkerGroup, height: int, width: int, num_frames: int) -> None:
    """One guided step of each expert at this shape, in this process or on every rank of a worker group."""
    if isinstance(denoiser, Denoiser):
        warm_up(denoiser, height, width, num_frames)
    else:
        denoiser.warm_up(height, width, num_frames)


def build_vae_decoder(
    ckpt: Checkpoint, cfg: ComponentConfig, artifacts: Path, device_id: int = 0
) -> VaeDecoder | VaeWorkerGroup:
    """Latents to video; both kinds give uint8 frames with `.frames(latents)`. With `split_width` above 1, a
    started worker group decoding the frame's width in that many strips (one GPU each from `device_id` on)."""
    if cfg.split_width > 1:
        from .parallel.group import VaeWorkerGroup

        ids = _group_device_ids(cfg, device_id, cfg.split_width, f"split_width {cfg.split_width}")
        group = VaeWorkerGroup(ckpt, cfg, ids)
        group.start()
        return group
    match cfg.engine:
        case EngineKind.TORCH:
            device, dtype = _device(cfg, device_id), DTYPES[cfg.precision]
            return VaeDecoder(ckpt, torch_vae_decode_fn(ckpt.load_vae(dtype, str(device))), device, dtype)
        case EngineKind.ONNXRUNTIME:
            from .vae_chunks import onnx_vae_decode_fn

            return VaeDecoder(
                ckpt, onnx_vae_decode_fn(artifacts, lambda p: _onnx_engine(p, cfg)), torch.device("cpu"), torch.float32
            )
        case EngineKind.TENSORRT:
            _reserved_tensorrt("vae_decoder")
    raise ValueError(f"unknown engine {cfg.engine}")
