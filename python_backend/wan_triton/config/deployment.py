"""The deployment config: engines, devices, precision, request limits and defaults, in one YAML file.

`make build` renders every Triton model from one of these files and writes the resolved result next to each
model as `deployment.json`, which the model.py files read at load time. Unknown keys are errors, so a typo in a
deployment file fails the build instead of being silently ignored.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from wan_triton.config.plan import ParallelPlan

Device = Literal["cpu", "cuda"]
Precision = Literal["float32", "bfloat16", "float16", "fp8"]
MIN_RESULT_CACHE_BYTES = 1 << 20
# Each rendered model's resolved deployment, read by its model.py at load time and by the server launcher.
DEPLOYMENT_FILE = "deployment.json"
REPOSITORY_MARKER = ".wan_t2v_repository"  # marks a model repository that `make build` rendered


class EngineKind(StrEnum):
    ONNXRUNTIME = "onnxruntime"  # the exported ONNX graphs; the default on CPU
    TORCH = "torch"  # the library modules (diffusers/transformers); the default on GPU
    TENSORRT = "tensorrt"  # reserved: compiled plans built from the same specs' profiles


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A LoRA's scale must be finite and within this bound: larger ones are typos, and blow the weights up.
MAX_LORA_SCALE = 8.0
LoraExpert = Literal["transformer", "transformer_2", "both"]


class LoraConfig(_Strict):
    """One LoRA adapter fused into the experts' weights at build time (wan_triton.model.lora)."""

    # A .safetensors file; a relative path is taken from the directory `make build` runs in. The build records the
    # absolute path and the file's SHA-256; a loader refuses the file if it has changed since.
    path: str
    scale: float = 1.0
    # Which expert the file applies to; `both` applies it to each, as loading it once per expert does in diffusers.
    expert: LoraExpert
    sha256: str | None = Field(default=None, description="set by `make build`")

    @model_validator(mode="after")
    def _scale_in_range(self) -> LoraConfig:
        if not math.isfinite(self.scale) or abs(self.scale) > MAX_LORA_SCALE:
            raise ValueError(
                f"scale: must be a finite number in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]; got {self.scale}"
                f" for {self.path}"
            )
        return self

    def applies_to(self, expert: str) -> bool:
        return self.expert in (expert, "both")


class SolverConfig(BaseModel):
    """Deployment key `scheduler`: the diffusers flow-matching scheduler class that replaces the checkpoint's
    solver, and overrides of its config (e.g. `shift`, `flow_shift`). Checked against the class at build."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str

    @property
    def overrides(self) -> dict[str, object]:
        return dict(self.model_extra or {})


class ComponentConfig(_Strict):
    engine: EngineKind
    device: Device = "cpu"
    # `fp8`: denoiser only, torch engine on Hopper GPUs (SM90, checked at load), one or a parallel plan's: the blocks'
    # linear layers and self-attention in e4m3 with scales per channel / token / head, everything else bf16
    # (wan_triton.kernels.fp8; speed and error: benchmarks/RESULTS.md, Precision).
    precision: Precision = "float32"
    instance_count: int = Field(default=1, ge=1)
    # Denoiser only: attention kernel of the torch engine (see wan_triton.kernels.attention). "auto" picks the fastest
    # installed on GPU (flash4, then flash3, then cudnn) and diffusers' own processor on CPU and in float32 (the
    # fused kernels take half precision only).
    attention: Literal["auto", "reference", "cudnn", "flash4", "flash3"] = "auto"
    # Denoiser only: regional torch.compile of every transformer block (fuses the norm/modulation/rotary
    # elementwise work around the GEMMs; benchmarks/RESULTS.md, Step time).
    compile_blocks: bool = False
    # Denoiser only (torch engine): `resident` keeps both experts on the device; `swap` keeps both in pinned host
    # memory and one on the device, copying the next expert in block by block during the step before the switch
    # (one expert's memory, no visible cost; see wan_triton.runtime.residency); `auto` keeps both resident when their
    # weights take at most 3/4 of the device's memory.
    expert_residency: Literal["auto", "resident", "swap"] = "auto"
    # Denoiser only (torch engine on CUDA): replay each expert's forward as a CUDA graph captured per input shape,
    # which removes the kernel-launch overhead that dominates small shapes (see wan_triton.runtime.engines.cuda_graph).
    # With a parallel plan the forward's collectives are captured too.
    cuda_graphs: bool = False

    # Denoiser only: multi-GPU plan, cfg x ulysses x tp ranks (wan_triton.parallel). Above 1x1x1 the scheduler
    # runs a worker group of that many processes (one GPU each on cuda; gloo on cpu) with the torch engine.
    parallel: ParallelPlan = ParallelPlan()
    # Denoiser only, plans with ulysses > 1: each rank exchanges and attends its heads in this many groups, starting
    # a group's all-to-all while the previous group is attended, so that only 1/G of the exchange is waited for
    # (wan_triton.parallel.ulysses). Must divide num_attention_heads / (ulysses x tp). The result is the same for
    # every G. Smaller groups mean smaller attention calls, which run less efficiently: on one GPU grouping shortens
    # the predicted ulysses2 step and lengthens the cfg2 x ulysses4 one, and the overlap is not yet measured on
    # several GPUs (benchmarks/RESULTS.md, Parallel), so the shipped deployments leave it at 1.
    ulysses_head_groups: int = Field(default=1, ge=1)
    # VAE decoder only (torch engine): decode split by frame width over this many processes (one GPU each from the
    # model's device on, on cuda; gloo on cpu), exact up to summation order (wan_triton.parallel.vae_split); its
    # speed-up: benchmarks/RESULTS.md, Parallel.
    split_width: int = Field(default=1, ge=1)
    # VAE decoder only (torch engine): torch.compile each of the decode's phase modules (wan_triton.model.vae_chunks),
    # which fuses the norms, activations, padding and cache copies around the convolutions; a size's first decode
    # compiles (the deployment's warm-up, at load). Speed: benchmarks/RESULTS.md, End to end.
    compile_phases: bool = False
    # Worker groups (a parallel plan, split_width > 1): a request fails when no rank has reported progress (a
    # denoising step, or its result) for this long, and the group is restarted before the next request. A rank hung
    # in a collective (a stuck GPU, a peer stopped without exiting) would otherwise hold the request, and the model
    # instance, forever. A shape that was not warmed up compiles (and captures graphs) within its first step, which
    # takes minutes at 720p: keep this well above that.
    worker_stall_timeout_s: float = Field(default=900.0, gt=0)
    # Denoiser only: LoRA adapters, applied in this order and fused into the experts' weights (exported graphs, TP
    # shards and the torch engine's experts alike), so they cost nothing at run time.
    loras: tuple[LoraConfig, ...] = ()

    @model_validator(mode="after")
    def _engine_options(self) -> ComponentConfig:
        if self.cuda_graphs and (self.engine != EngineKind.TORCH or self.device != "cuda"):
            raise ValueError("cuda_graphs needs engine: torch and device: cuda")
        if self.expert_residency == "swap" and self.engine != EngineKind.TORCH:
            raise ValueError("expert_residency: swap needs engine: torch")
        if not self.parallel.is_single and self.engine != EngineKind.TORCH:
            raise ValueError(f"parallel plan {self.parallel} needs engine torch, not {self.engine.value}")
        if not self.parallel.is_single and self.instance_count != 1:
            # One instance owns the group's GPUs (0 .. world size - 1); a second would share them.
            raise ValueError(
                f"parallel plan {self.parallel} runs one instance (one worker group), not {self.instance_count}"
            )
        if self.split_width > 1 and (self.engine != EngineKind.TORCH or self.instance_count != 1):
            raise ValueError(f"split_width {self.split_width} needs engine torch and one instance")
        if self.compile_phases and (self.engine != EngineKind.TORCH or self.split_width > 1):
            raise ValueError("compile_phases needs engine: torch and split_width 1")
        if self.split_width > 1 and self.precision == "float16":
            # A clip whose float16 decode overflows is decoded again in float32 (wan_triton.model.vae), which the
            # ranks of a split decode do not do.
            raise ValueError(
                f"split_width {self.split_width} does not combine with precision float16 (no float32 fallback for "
                "a clip that overflows); use bfloat16 or float32"
            )
        if self.ulysses_head_groups > 1 and self.parallel.ulysses == 1:
            raise ValueError(f"ulysses_head_groups {self.ulysses_head_groups} needs a plan with ulysses > 1")
        if self.precision == "fp8" and (self.engine != EngineKind.TORCH or self.device != "cuda"):
            raise ValueError("precision fp8 needs engine: torch and device: cuda (a Hopper GPU)")
        if not self.parallel.is_single and self.expert_residency == "swap":
            # The ranks keep their experts resident: a TP shard is what makes both experts fit.
            raise ValueError(f"parallel plan {self.parallel} does not combine with expert_residency: swap")
        return self


class Components(_Strict):
    text_encoder: ComponentConfig
    denoiser: ComponentConfig
    vae_decoder: ComponentConfig
    # Condition images to latents (image-to-video checkpoints; runs in the scheduler step). Left out, it takes the
    # VAE decoder's engine, device and precision.
    vae_encoder: ComponentConfig = None  # type: ignore[assignment]  # filled by _default_vae_encoder

    @model_validator(mode="before")
    @classmethod
    def _default_vae_encoder(cls, data):
        if isinstance(data, dict) and data.get("vae_encoder") is None and data.get("vae_decoder") is not None:
            decoder = data["vae_decoder"]
            decoder = decoder.model_dump() if isinstance(decoder, BaseModel) else dict(decoder)
            data = {**data, "vae_encoder": {k: decoder[k] for k in ("engine", "device", "precision") if k in decoder}}
        return data

    @model_validator(mode="after")
    def _parallel_settings_in_place(self) -> Components:
        # Each parallel setting belongs to one component: a plan splits the denoiser, split_width the VAE decode.
        for name in ("text_encoder", "vae_decoder", "vae_encoder"):
            if not getattr(self, name).parallel.is_single:
                raise ValueError(f"{name}: parallel is a denoiser setting (the VAE decode splits with split_width)")
        for name in ("text_encoder", "vae_decoder", "vae_encoder"):
            if getattr(self, name).precision == "fp8":
                raise ValueError(f"{name}: precision fp8 is a denoiser setting")
        for name in ("text_encoder", "denoiser", "vae_encoder"):
            if getattr(self, name).split_width != 1:
                raise ValueError(f"{name}: split_width is a vae_decoder setting")
        for name in ("text_encoder", "vae_decoder", "vae_encoder"):
            if getattr(self, name).loras:
                raise ValueError(f"{name}: loras is a denoiser setting")
        for name in ("text_encoder", "denoiser", "vae_encoder"):
            if getattr(self, name).compile_phases:
                raise ValueError(f"{name}: compile_phases is a vae_decoder setting")
        return self


class Limits(_Strict):
    """The largest request accepted. Engine shape ranges (ONNX dims, TensorRT profiles) are derived from these."""

    max_height: int = Field(gt=0)
    max_width: int = Field(gt=0)
    max_pixels: int = Field(gt=0, description="height x width")
    max_num_frames: int = Field(gt=0)
    max_num_inference_steps: int = Field(gt=0)
    max_prompt_chars: int = Field(gt=0)
    max_guidance_scale: float = Field(default=50.0, gt=0)
    max_fps: int = Field(default=120, gt=0)
    # The largest `timeout_s` a request may ask for (a 720p A14B request of 40 steps takes minutes on one GPU:
    # benchmarks/RESULTS.md, End to end).
    max_timeout_s: float = Field(default=3600.0, gt=0)
    # The `image` input of image-to-video models: its file size, and its width x height read from the file's header
    # before any pixel is decoded (a small file can declare a huge image). 4096x4096 is far above any video size the
    # image is resized to.
    max_image_bytes: int = Field(default=20 << 20, gt=0)
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)


class Defaults(_Strict):
    """Values used for optional request inputs that a request leaves out."""

    negative_prompt: str = ""
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float
    fps: int
    # None: no deadline unless the request sets `timeout_s`.
    timeout_s: float | None = Field(default=None, gt=0)


class WarmupShape(_Strict):
    """A request shape run once at load, before the model reports ready (compiles kernels, fills caches)."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    num_frames: int = Field(gt=0)


class Serving(_Strict):
    """How the scheduler step (the denoising loop) queues and batches requests; rendered into its config.pbtxt as
    Triton's own `max_batch_size` and `dynamic_batching` (see README "Queue limit and batching")."""

    # Requests with the same shape settings (size, frames, steps, guidance on/off) run their expert forwards as one
    # batch of up to this many requests. 1 turns batching off.
    max_batch_size: int = Field(default=1, ge=1, le=64)
    # Requests waiting for the scheduler beyond those it runs; one more is refused at once with UNAVAILABLE
    # ("Exceeds maximum queue size"). None: unbounded.
    max_queue_size: int | None = Field(default=None, ge=1)
    # How long the batcher may hold a request to fill a batch (Triton's max_queue_delay_microseconds). 0: batch
    # only what is already waiting when an instance frees up, so a lone request is never delayed.
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=60_000)
    # Triton's CUDA memory pool per GPU (`--cuda-memory-pool-byte-size`), in MiB, set by `make serve` when a component
    # runs on a GPU. GPU tensors waiting between steps live there: prompt embeddings (16 MiB a request for A14B in
    # fp32) and latents (8 MiB at 480p, 19 MiB at 720p, 81 frames). With Triton's default of 64 MiB a few waiting
    # 480p requests filled it, and the Python backend stub then failed to copy their inputs ("failed to copy data")
    # while the requests still succeeded, with wrong frames (benchmarks/RESULTS.md, Throughput). Size it for
    # (max_queue_size + max_batch_size + 2) requests at the largest shape.
    cuda_memory_pool_mib: int = Field(default=1024, ge=64, le=65_536)
    # The nice value each Python-backend stub gives its model's threads, above the stub's health thread, so that a
    # busy host never delays that thread past the backend's one-second check (docs/triton-2.51-notes.md, "A stub
    # taken for dead"). 0 leaves them at the server's priority, beside other processes of the host.
    model_thread_nice: int = Field(default=5, ge=0, le=19)


class Video(_Strict):
    """The MP4 of each request (wan_triton.model.video): x264's preset, CRF and tune, and which step encodes it.
    Faster presets and higher CRFs encode faster into larger or lossier files; `frames` are unaffected."""

    x264_preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
    ] = "fast"
    x264_crf: int = Field(default=17, ge=0, le=51)
    # x264's tune, none by default. `zerolatency` codes each frame as it arrives (no lookahead, no B-frames): with
    # `encode_while_decoding` the MP4 is done almost as soon as the last chunk decodes, instead of a lookahead's
    # worth of frames later; at the same CRF the file comes out larger or smaller depending on the content
    # (benchmarks/RESULTS.md, End to end).
    x264_tune: Literal["film", "animation", "grain", "stillimage", "fastdecode", "zerolatency"] | None = None
    # Encode in the vae_decoder step, each decoded chunk on a worker thread while the next decodes, instead of in
    # the postprocess step after the whole decode, so that the encode runs during the decode. The MP4 is the same
    # bytes either way. Worth it where the decode runs on a GPU and leaves the host's cores free; on a CPU decode
    # the two share the cores.
    encode_while_decoding: bool = False


class Deployment(_Strict):
    model_name: str = "wan_t2v"
    checkpoint: str | None = Field(default=None, description="checkpoint directory; set by `make build MODEL=`")
    components: Components
    limits: Limits
    defaults: Defaults
    # Shapes the engines are tuned for (TensorRT profile "opt"; warm-up later).
    opt_height: int | None = None
    opt_width: int | None = None
    opt_num_frames: int | None = None
    warmup: list[WarmupShape] = Field(default_factory=list)
    # Result cache: identical requests (same inputs, seed included) answered from Triton's response cache, bounded
    # to this many bytes of CPU memory. 0 is off. When on, `seed` is required (see README "Result cache").
    result_cache_bytes: int = Field(default=0, ge=0)
    serving: Serving = Field(default_factory=Serving)
    # The solver: None keeps the checkpoint's (model_index.json); else a diffusers scheduler class and overrides.
    scheduler: SolverConfig | None = None
    video: Video = Field(default_factory=Video)

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Deployment:
        d, lim = self.defaults, self.limits
        problems = []
        for name in ("text_encoder", "vae_decoder"):
            if not getattr(self.components, name).parallel.is_single:
                problems.append(f"components.{name}.parallel: only the denoiser runs a parallel plan")
        if d.height > lim.max_height or d.width > lim.max_width or d.height * d.width > lim.max_pixels:
            problems.append(f"default size {d.width}x{d.height} is above the limits")
        if d.num_frames > lim.max_num_frames:
            problems.append(f"default num_frames {d.num_frames} > max_num_frames {lim.max_num_frames}")
        if not 1 <= d.num_inference_steps <= lim.max_num_inference_steps:
            problems.append(f"default num_inference_steps {d.num_inference_steps} outside [1, max]")
        if d.timeout_s is not None and d.timeout_s > lim.max_timeout_s:
            problems.append(f"default timeout_s {d.timeout_s} > max_timeout_s {lim.max_timeout_s}")
        for shape in self.warmup:
            if shape.height > lim.max_height or shape.width > lim.max_width or shape.num_frames > lim.max_num_frames:
                problems.append(f"warm-up shape {shape} is above the limits")
        if self.video.encode_while_decoding and self.components.vae_decoder.split_width > 1:
            # The split decode's strips meet on rank 0 only when the whole video is decoded.
            problems.append("video.encode_while_decoding needs components.vae_decoder.split_width 1")
        if 0 < self.result_cache_bytes < MIN_RESULT_CACHE_BYTES:
            # Triton's local cache cannot initialise below ~1 KiB, and below 1 MiB it holds no default CPU result.
            problems.append(f"result_cache_bytes must be 0 (off) or at least {MIN_RESULT_CACHE_BYTES}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def load(cls, path: str | Path) -> Deployment:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)
