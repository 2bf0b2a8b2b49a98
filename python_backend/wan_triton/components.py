"""Build each component (text encoder, denoiser experts, VAE encoder and decoder) with the engine its config names."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from wan_triton.config.deployment import ComponentConfig, EngineKind
from wan_triton.config.precision import DTYPES
from wan_triton.model.checkpoint import EXPERTS, Checkpoint
from wan_triton.model.denoise import Denoiser, warm_up
from wan_triton.model.engine import Engine
from wan_triton.model.vae import (
    VaeDecoder,
    VaeEncoder,
    torch_vae_decode_chunks_fn,
    torch_vae_decode_fn,
    torch_vae_encode_fn,
)
from wan_triton.model.vae_chunks import TorchVaeDecoder, onnx_vae_decoder, onnx_vae_encode_fn
from wan_triton.parallel.tp_shards import find_shards
from wan_triton.runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from wan_triton.runtime.engines.tensorrt_engine import TensorRTEngine
from wan_triton.runtime.engines.torch_engine import text_encoder_engine
from wan_triton.runtime.experts import swapped_experts, torch_engines, torch_expert
from wan_triton.runtime.fp8_weights import find_fp8_weights
from wan_triton.runtime.residency import choose_residency
from wan_triton.workers.supervisor import VaeWorkerGroup, WorkerGroup

logger = logging.getLogger(__name__)


def _device(cfg: ComponentConfig, device_id: int) -> torch.device:
    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("the deployment asks for device 'cuda' but no CUDA device is available")
    return torch.device("cuda", device_id)


def _onnx_engine(path: Path, cfg: ComponentConfig) -> Engine:
    if cfg.precision != "float32":
        raise ValueError(f"the onnxruntime engine runs float32 graphs; precision {cfg.precision!r} is not supported")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported graph missing; run `make build`")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cfg.device == "cuda" else ["CPUExecutionProvider"]
    return OnnxRuntimeEngine(path, providers=providers)


def _reserved_tensorrt(component: str) -> Engine:
    return TensorRTEngine(component)


def build_text_encoder(ckpt: Checkpoint, cfg: ComponentConfig, artifacts: Path, device_id: int = 0) -> Engine:
    match cfg.engine:
        case EngineKind.TORCH:
            device, dtype = _device(cfg, device_id), DTYPES[cfg.precision]
            return text_encoder_engine(ckpt.load_text_encoder(dtype, str(device)), device, dtype)
        case EngineKind.ONNXRUNTIME:
            return _onnx_engine(artifacts / "text_encoder.onnx", cfg)
        case EngineKind.TENSORRT:
            return _reserved_tensorrt("text_encoder")
    raise ValueError(f"unknown engine {cfg.engine}")


def build_vae_encoder(ckpt: Checkpoint, cfg: ComponentConfig, artifacts: Path, device_id: int = 0) -> VaeEncoder | None:
    """Condition image -> normalized condition latents, for checkpoints that take an image (None for T2V-A14B)."""
    if ckpt.image_input == "none":
        return None
    match cfg.engine:
        case EngineKind.TORCH:
            device, dtype = _device(cfg, device_id), DTYPES[cfg.precision]
            return VaeEncoder(ckpt, torch_vae_encode_fn(ckpt.load_vae(dtype, str(device))), device, dtype)
        case EngineKind.ONNXRUNTIME:
            encode = onnx_vae_encode_fn(artifacts, lambda p: _onnx_engine(p, cfg))
            return VaeEncoder(ckpt, encode, torch.device("cpu"), torch.float32)
        case EngineKind.TENSORRT:
            _reserved_tensorrt("vae_encoder")
    raise ValueError(f"unknown engine {cfg.engine}")


def build_denoiser(
    ckpt: Checkpoint,
    cfg: ComponentConfig,
    artifacts: Path,
    device_id: int = 0,
    vae_encoder: ComponentConfig | None = None,
) -> Denoiser | WorkerGroup:
    """The denoising loop with the checkpoint's experts, and the VAE encoder its condition images need (built from
    `vae_encoder`, the deployment's `components.vae_encoder`; on a worker group each rank encodes with the torch
    engine). With a parallel plan above 1x1x1, a started worker group of that many processes (one GPU each from
    `device_id` on, on cuda), which is called like a Denoiser."""
    if not cfg.parallel.is_single:
        return _worker_group(ckpt, cfg, artifacts, device_id)
    encoder = build_vae_encoder(ckpt, vae_encoder, artifacts, device_id) if vae_encoder is not None else None
    device, dtype = _device(cfg, device_id), DTYPES[cfg.precision]
    experts: dict[str, Engine] = {}
    swapper = None
    match cfg.engine:
        case EngineKind.TORCH:
            expert_bytes = ckpt.expert_weight_bytes(dtype)
            if cfg.precision == "fp8":
                # The blocks' linear layers, nearly all of an expert's weights, take one byte a parameter.
                expert_bytes //= 2
            residency = choose_residency(cfg.expert_residency, expert_bytes, device)
            logger.info("denoiser experts: %s", residency)
            fp8_folder = find_fp8_weights(artifacts, ckpt) if cfg.precision == "fp8" else None
            if residency == "swap" and all(map(ckpt.has_expert, EXPERTS)):
                experts, swapper = swapped_experts(ckpt, cfg, device, dtype, fp8_folder)
            else:
                for name in filter(ckpt.has_expert, EXPERTS):
                    module, _ = torch_expert(ckpt, name, cfg, device, dtype, fp8_folder)
                    eager, graphed = torch_engines(module, device, dtype, cfg.cuda_graphs)
                    experts[name] = graphed or eager
        case EngineKind.ONNXRUNTIME:
            for name in filter(ckpt.has_expert, EXPERTS):
                experts[name] = _onnx_engine(artifacts / f"{name}.onnx", cfg)
            device, dtype = torch.device("cpu"), torch.float32  # ORT takes host tensors
        case EngineKind.TENSORRT:
            for name in filter(ckpt.has_expert, EXPERTS):
                experts[name] = _reserved_tensorrt(name)
    return Denoiser(ckpt=ckpt, experts=experts, device=device, dtype=dtype, swapper=swapper, vae_encoder=encoder)


def _group_device_ids(cfg: ComponentConfig, device_id: int, world: int, what: str) -> tuple[int, ...]:
    """GPUs device_id .. device_id + world - 1 on cuda (checked to exist); none on cpu."""
    if cfg.device != "cuda":
        return ()
    if not torch.cuda.is_available() or torch.cuda.device_count() < device_id + world:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise RuntimeError(f"{what} needs GPUs {device_id}..{device_id + world - 1}; {available} found")
    return tuple(range(device_id, device_id + world))


def _worker_group(ckpt: Checkpoint, cfg: ComponentConfig, artifacts: Path, device_id: int) -> WorkerGroup:
    device_ids = _group_device_ids(cfg, device_id, cfg.parallel.world_size, f"plan {cfg.parallel}")
    group = WorkerGroup(
        ckpt,
        cfg,
        device_ids,
        shards=find_shards(artifacts, ckpt, cfg.parallel, cfg.precision),
        fp8_weights=find_fp8_weights(artifacts, ckpt) if cfg.precision == "fp8" else None,
    )
    group.start()
    return group


def warm_up_denoiser(
    denoiser: Denoiser | WorkerGroup, height: int, width: int, num_frames: int, guided: bool = True
) -> None:
    """One step of each expert at this shape (guided: a batch of 2), in this process or on every rank of a worker
    group."""
    if isinstance(denoiser, Denoiser):
        warm_up(denoiser, height, width, num_frames, guided)
    else:
        denoiser.warm_up(height, width, num_frames, guided)


def _torch_vae_decoder(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, compile_phases: bool = False
) -> VaeDecoder:
    vae = ckpt.load_vae(dtype, str(device))
    # float16 keeps 3 more mantissa bits than bfloat16 (on the tiny model 0.1 uint8 levels from float32 on average,
    # against 0.9), on the same tensor cores, but not its range: a clip whose decode overflows is decoded again in
    # float32, and so is every later one. The float32 decoder is not compiled: it is built when a clip overflows, and
    # compiling it then would hold that request for minutes.
    fallback = (lambda: _torch_vae_decoder(ckpt, device, torch.float32)) if dtype == torch.float16 else None
    if not compile_phases:
        return VaeDecoder(ckpt, torch_vae_decode_fn(vae), device, dtype, torch_vae_decode_chunks_fn(vae), fallback)
    # Compiled, the whole video goes through the same phase modules as the chunks (bit-identical to vae.decode
    # eagerly), so that both paths use the one set of compiled graphs.
    phases = TorchVaeDecoder(vae, whole_post_quant_conv=True)
    phases.compile()
    return VaeDecoder(ckpt, phases.decode, device, dtype, phases.decode_chunks, fallback)


def build_vae_decoder(
    ckpt: Checkpoint, cfg: ComponentConfig, artifacts: Path, device_id: int = 0
) -> VaeDecoder | VaeWorkerGroup:
    """Latents to video; both kinds give uint8 frames with `.frames(latents)`. With `split_width` above 1, a
    started worker group decoding the frame's width in that many strips (one GPU each from `device_id` on)."""
    if cfg.split_width > 1:
        ids = _group_device_ids(cfg, device_id, cfg.split_width, f"split_width {cfg.split_width}")
        group = VaeWorkerGroup(ckpt, cfg, ids)
        group.start()
        return group
    match cfg.engine:
        case EngineKind.TORCH:
            device, dtype = _device(cfg, device_id), DTYPES[cfg.precision]
            return _torch_vae_decoder(ckpt, device, dtype, cfg.compile_phases)
        case EngineKind.ONNXRUNTIME:
            phases = onnx_vae_decoder(artifacts, lambda p: _onnx_engine(p, cfg))
            return VaeDecoder(ckpt, phases.decode, torch.device("cpu"), torch.float32, phases.decode_chunks)
        case EngineKind.TENSORRT:
            _reserved_tensorrt("vae_decoder")
    raise ValueError(f"unknown engine {cfg.engine}")
