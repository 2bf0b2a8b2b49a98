"""The Wan VAE decoder, one latent frame at a time, with its causal-conv cache as explicit tensors.

diffusers' `AutoencoderKLWan._decode` runs the decoder once per latent frame and threads a Python list
(`feat_cache`) through the calls: one entry per causal conv, holding None, the marker "Rep" or the last 1-2
frames that conv saw. A graph exported over a whole latent video would unroll that loop for one frame count, so
the decode is split into *phases* instead: phase 0 decodes the first chunk (no cache in), phase 1 the second
(cache as chunk 0 left it), and so on until a phase's cache structure in equals its structure out; that last
phase serves every later chunk. Which entries are None, "Rep" or tensors, and how many frames each tensor holds,
is fixed per phase, so the markers live in the module's structure and only tensors cross the graph boundary.

The layouts are found by running the decoder on the meta device, so they come from the VAE config alone (no
weights), for any Wan VAE variant (2.1 and the residual 2.2 decoder with `first_chunk` handling and patching).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wan_triton.model.engine import Engine

logger = logging.getLogger(__name__)

REP = "Rep"  # diffusers' marker: a temporal upsampler that has seen one chunk and replicates instead of caching
MAX_PHASES = 8  # Wan needs 3; more would mean the cache never settles, which the layout trace reports
# Compiled phase graphs (phases x video sizes) before dynamo stops compiling new ones.
COMPILED_GRAPHS_LIMIT = 64
# The oldest torch whose dynamo traces the phases: 2.11's stops at the upsampler's `feat_cache[idx] == "Rep"` (a
# tensor compared with a string, in diffusers' Wan VAE) when the first decode compiles; 2.13 traces it.
COMPILE_MIN_TORCH = "2.13"


@dataclass(frozen=True)
class CacheSlot:
    """A cached tensor [1, channels, frames, latent_h * scale_h, latent_w * scale_w]."""

    channels: int
    frames: int
    scale_h: int
    scale_w: int


# One feat_cache entry as a phase sees it: nothing yet, the "Rep" marker, or a tensor.
SlotState = CacheSlot | str | None


@dataclass(frozen=True)
class PhaseLayout:
    """What one phase graph consumes and produces."""

    index: int
    first_chunk: bool
    inputs: tuple[SlotState, ...]  # per decoder conv, the cache entry before the chunk
    outputs: tuple[SlotState, ...]  # ... and after it
    video_channels: int
    video_frames: int
    video_scale: tuple[int, int]  # pixels per latent pixel (height, width)

    @property
    def input_slots(self) -> list[int]:
        """Cache entries that enter the graph as tensors, in input order."""
        return [i for i, s in enumerate(self.inputs) if isinstance(s, CacheSlot)]

    @property
    def output_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.outputs) if isinstance(s, CacheSlot)]


def _describe(entry: Any, latent_hw: tuple[int, int]) -> SlotState:
    if entry is None or isinstance(entry, str):
        return entry
    _, c, t, h, w = entry.shape
    return CacheSlot(int(c), int(t), int(h) // latent_hw[0], int(w) // latent_hw[1])


def _unpatchify(x: torch.Tensor, patch_size: int | None) -> torch.Tensor:
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    return x if patch_size is None else unpatchify(x, patch_size=patch_size)


def trace_layouts(vae: nn.Module) -> list[PhaseLayout]:
    """Run the decoder chunk by chunk on meta tensors and record the cache structure around each chunk.

    Stops at the first phase (after phase 0, whose `first_chunk` flag differs) whose structure out equals its
    structure in; that phase then repeats for every later chunk.
    """
    if next(vae.parameters()).device.type != "meta":
        # Only shapes matter: a meta copy avoids running (and touching) the real weights.
        vae = _meta_vae(vae.config)
    decoder, post_quant_conv = vae.decoder, vae.post_quant_conv
    # Odd, distinct sizes so that per-axis scale factors cannot be confused.
    latent_hw = (3, 5)
    meta = torch.device("meta")
    cache: list[Any] = [None] * vae._cached_conv_counts["decoder"]
    layouts: list[PhaseLayout] = []
    with torch.no_grad():
        for k in range(MAX_PHASES):
            before = tuple(_describe(e, latent_hw) for e in cache)
            x = post_quant_conv(torch.empty(1, vae.config.z_dim, 1, *latent_hw, device=meta))
            out = decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=k == 0)
            out = _unpatchify(out, vae.config.patch_size)
            after = tuple(_describe(e, latent_hw) for e in cache)
            layouts.append(
                PhaseLayout(
                    index=k,
                    first_chunk=k == 0,
                    inputs=before,
                    outputs=after,
                    video_channels=int(out.shape[1]),
                    video_frames=int(out.shape[2]),
                    video_scale=(int(out.shape[3]) // latent_hw[0], int(out.shape[4]) // latent_hw[1]),
                )
            )
            if k > 0 and after == before:
                logger.debug("Wan VAE decoder: %d phases, %d cache tensors in steady state", k + 1, len(after))
                return layouts
    raise RuntimeError(f"the VAE decoder cache did not reach a steady structure within {MAX_PHASES} chunks")


def _meta_vae(config: dict[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan.from_config(dict(config)).eval()


def layouts_from_config(vae_config: dict[str, Any]) -> list[PhaseLayout]:
    """The phase layouts of the VAE described by `vae/config.json`, without loading weights."""
    return trace_layouts(_meta_vae(vae_config))


def _cache_in(phase: str, layout: PhaseLayout | EncoderPhaseLayout, cache: Sequence[torch.Tensor]) -> list[Any]:
    """The `feat_cache` list a chunk starts from: the layout's non-tensor entries (None, "Rep") as they are, and the
    given tensors in its cache slots."""
    slots = layout.input_slots
    if len(cache) != len(slots):
        raise ValueError(f"{phase} {layout.index} takes {len(slots)} cache tensors, got {len(cache)}")
    feat_cache: list[Any] = [s if not isinstance(s, CacheSlot) else None for s in layout.inputs]
    for slot, tensor in zip(slots, cache, strict=True):
        feat_cache[slot] = tensor
    return feat_cache


def _cache_out(phase: str, layout: PhaseLayout | EncoderPhaseLayout, feat_cache: list[Any]) -> list[torch.Tensor]:
    """The cache tensors a chunk leaves, in `layout.output_slots` order. The VAE's control flow is all Python on
    static frame counts, so the structure it leaves is the layout's; a mismatch would mean the layout trace and the
    phase module disagree about the VAE."""
    for slot, (expected, entry) in enumerate(zip(layout.outputs, feat_cache, strict=True)):
        if isinstance(expected, CacheSlot):
            ok = isinstance(entry, torch.Tensor) and entry.shape[1:3] == (expected.channels, expected.frames)
        else:
            ok = not isinstance(entry, torch.Tensor) and entry == expected
        if not ok:
            raise RuntimeError(f"{phase} {layout.index}: cache slot {slot} is {entry!r}, expected {expected!r}")
    return [feat_cache[i] for i in layout.output_slots]


class VaeDecoderPhase(nn.Module):
    """One phase: `forward(latent_chunk, *cache) -> (video_chunk, *new_cache)`.

    `latent_chunk` is one latent frame [1, z_dim, 1, h, w] as `vae.decode` takes it (before post_quant_conv, which
    is 1x1x1 and so runs per chunk here). `video_chunk` is unpatchified and clamped to [-1, 1] like `decode`'s
    output; concatenating the chunks on dim 2 gives the video. Cache tensors follow `layout.input_slots` /
    `layout.output_slots` order; the None/"Rep" entries are rebuilt from the layout, not passed.
    """

    def __init__(self, vae: nn.Module, layout: PhaseLayout) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.layout = layout
        self.patch_size = vae.config.patch_size
        self.eval()

    def forward(self, latent_chunk: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layout = self.layout
        feat_cache = _cache_in("VAE phase", layout, cache)
        x = self.post_quant_conv(latent_chunk)
        out = self.decoder(x, feat_cache=feat_cache, feat_idx=[0], first_chunk=layout.first_chunk)
        out = _unpatchify(out, self.patch_size).clamp(-1.0, 1.0)
        return (out, *_cache_out("VAE phase", layout, feat_cache))


def build_phase_modules(vae: nn.Module, layouts: Sequence[PhaseLayout] | None = None) -> list[VaeDecoderPhase]:
    layouts = layouts if layouts is not None else trace_layouts(vae)
    return [VaeDecoderPhase(vae, layout) for layout in layouts]


RunPhase = Callable[[int, list[torch.Tensor]], list[torch.Tensor]]


def decode_latents(run_phase: RunPhase, latents: torch.Tensor, num_phases: int) -> torch.Tensor:
    """Decode [B, z_dim, F, h, w] latents (as `vae.decode` takes them) into a [B, 3, frames, H, W] video in
    [-1, 1].

    `run_phase(k, [latent_chunk, *cache])` runs phase k and returns `[video_chunk, *new_cache]`. Chunk i uses
    phase min(i, num_phases - 1). Batch items are decoded one after another, as the phase graphs are batch 1
    (diffusers' sliced decode does the same).
    """
    _check_latents(latents)
    videos = [torch.cat(list(decode_chunks(run_phase, item, num_phases)), dim=2) for item in latents.split(1)]
    return torch.cat(videos)


def decode_chunks(run_phase: RunPhase, latents: torch.Tensor, num_phases: int) -> Iterator[torch.Tensor]:
    """`decode_latents` of one clip [1, z_dim, F, h, w], a video chunk [1, 3, frames, H, W] per latent frame as it is
    decoded (1 frame, then the VAE's temporal stride each)."""
    _check_latents(latents)
    if latents.shape[0] != 1:
        raise ValueError(f"decode_chunks takes one clip, got a batch of {latents.shape[0]}")
    cache: list[torch.Tensor] = []
    for i in range(latents.shape[2]):
        outputs = run_phase(min(i, num_phases - 1), [latents[:, :, i : i + 1].contiguous(), *cache])
        cache = list(outputs[1:])
        yield outputs[0]


def _check_latents(latents: torch.Tensor) -> None:
    if latents.ndim != 5 or 0 in latents.shape:
        raise ValueError(f"expected non-empty latents [B, C, F, h, w], got shape {tuple(latents.shape)}")


class TorchVaeDecoder:
    """The phase modules run eagerly: the reference for the exported graphs and the GPU/torch path.

    With `whole_post_quant_conv`, post_quant_conv runs over all latent frames at once before the chunks, as
    `vae.decode` runs it, instead of per chunk inside each phase: the decoder then sees the very tensors it sees in
    `vae.decode`, so the video is bit-identical to it on any device (per chunk, a GPU may pick another conv
    algorithm)."""

    def __init__(self, vae: nn.Module, whole_post_quant_conv: bool = False) -> None:
        self.phases = build_phase_modules(vae)
        self.post_quant_conv: nn.Module | None = None
        if whole_post_quant_conv:
            self.post_quant_conv = vae.post_quant_conv
            for phase in self.phases:
                phase.post_quant_conv = nn.Identity()

    def _run(self, k: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.phases[k](*tensors))

    def compile(self, backend: str = "inductor") -> None:
        """torch.compile every phase for the shapes it meets (each phase's structure is fixed, so one graph a phase
        and size). The phases share one forward, and dynamo's default of 8 graphs per code object would run a third
        size (9 graphs) eagerly without a word: allow COMPILED_GRAPHS_LIMIT."""
        if torch.torch_version.TorchVersion(torch.__version__) < COMPILE_MIN_TORCH:
            raise RuntimeError(
                f"compile_phases needs torch {COMPILE_MIN_TORCH} or later: torch {torch.__version__} cannot compile "
                "the Wan VAE's decode phases; set components.vae_decoder.compile_phases: false"
            )
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS_LIMIT)
        self.phases = [torch.compile(phase, backend=backend, dynamic=False, fullgraph=True) for phase in self.phases]

    def _before_chunks(self, latents: torch.Tensor) -> torch.Tensor:
        return latents if self.post_quant_conv is None else self.post_quant_conv(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self._run, self._before_chunks(latents), len(self.phases))

    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        with torch.no_grad():
            yield from decode_chunks(self._run, self._before_chunks(latents), len(self.phases))


class EnginePhases:
    """Phase graphs run through engines (ONNX Runtime, TensorRT), one engine a phase.

    `io_names[k]` = (input names, output names) of phase k in phase order, e.g. from the phase specs
    (`specs.vae_decoder_phase_specs`); by default the engines' own `input_names`/`output_names`, which for the
    exported graphs are in that order.
    """

    def __init__(
        self, engines: Sequence[Engine], io_names: Sequence[tuple[Sequence[str], Sequence[str]]] | None = None
    ) -> None:
        if io_names is None:
            io_names = [(e.input_names, e.output_names) for e in engines]  # type: ignore[attr-defined]
        if len(engines) != len(io_names):
            raise ValueError(f"{len(engines)} engines for {len(io_names)} VAE phases")
        self.engines = list(engines)
        self.io_names = [(list(i), list(o)) for i, o in io_names]

    def _run(self, k: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        input_names, output_names = self.io_names[k]
        outputs = self.engines[k].run(dict(zip(input_names, tensors, strict=True)))
        return [outputs[name] for name in output_names]


class EngineVaeDecoder(EnginePhases):
    """The decoder's phase graphs (`VaeDecoderPhase` order) run through engines."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self._run, latents, len(self.engines))

    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        return decode_chunks(self._run, latents, len(self.engines))


def phase_graphs(artifacts: Path, path_of: Callable[[Path, int], Path], what: str) -> list[Path]:
    """The exported phase graphs `path_of(artifacts, 0)`, `path_of(artifacts, 1)`, ... that exist (at least 2)."""
    paths: list[Path] = []
    while path_of(artifacts, len(paths)).is_file():
        paths.append(path_of(artifacts, len(paths)))
    if len(paths) < 2:
        raise FileNotFoundError(f"{artifacts}: {what} phase graphs missing (found {len(paths)}); run `make build`")
    return paths


def phase_graph_path(artifacts: Path, k: int) -> Path:
    return artifacts / f"vae_decoder_phase{k}.onnx"


def onnx_vae_decoder(artifacts: Path, make_engine: Callable[[Path], Engine]) -> EngineVaeDecoder:
    """The exported `vae_decoder_phase{k}.onnx` graphs in `artifacts`, each run by `make_engine(path)`."""
    paths = phase_graphs(artifacts, phase_graph_path, "VAE decoder")
    return EngineVaeDecoder([make_engine(p) for p in paths])


def onnx_vae_decode_fn(
    artifacts: Path, make_engine: Callable[[Path], Engine]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`decode(latents) -> video` over the exported `vae_decoder_phase{k}.onnx` graphs in `artifacts`."""
    return onnx_vae_decoder(artifacts, make_engine).decode


# ---------------------------------------------------------------------------------------------------------------
# The encoder: the same phase split for `AutoencoderKLWan._encode`, which runs the encoder on the first frame, then
# on chunks of ENCODER_CHUNK_FRAMES frames, threading its own feat_cache through the calls.

ENCODER_CHUNK_FRAMES = 4  # diffusers' `_encode` chunk after the first frame


@dataclass(frozen=True)
class EncoderPhaseLayout:
    """What one encoder phase graph consumes and produces: `frames` pixel frames (1 in phase 0, else 4) and the
    cache in, one latent frame (the posterior mean, z_dim channels) and the cache out."""

    index: int
    frames: int
    inputs: tuple[SlotState, ...]
    outputs: tuple[SlotState, ...]
    video_channels: int  # pixel channels (3)
    pixel_scale: int  # pixels per latent pixel (the VAE's spatial stride, patch included)
    latent_channels: int

    @property
    def input_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.inputs) if isinstance(s, CacheSlot)]

    @property
    def output_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.outputs) if isinstance(s, CacheSlot)]


def _patchify(x: torch.Tensor, patch_size: int | None) -> torch.Tensor:
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

    return x if patch_size is None else patchify(x, patch_size=patch_size)


def trace_encoder_layouts(vae: nn.Module) -> list[EncoderPhaseLayout]:
    """Run the encoder chunk by chunk on meta tensors until a phase's cache structure out equals its structure in
    (that phase then repeats for every later chunk), as `trace_layouts` does for the decoder."""
    if next(vae.parameters()).device.type != "meta":
        vae = _meta_vae(vae.config)
    config = vae.config
    scale = int(config.scale_factor_spatial)
    latent_hw = (3, 5)
    meta = torch.device("meta")
    cache: list[Any] = [None] * vae._cached_conv_counts["encoder"]
    layouts: list[EncoderPhaseLayout] = []
    with torch.no_grad():
        for k in range(MAX_PHASES):
            frames = 1 if k == 0 else ENCODER_CHUNK_FRAMES
            before = tuple(_describe(e, latent_hw) for e in cache)
            x = _patchify(
                torch.empty(1, 3, frames, latent_hw[0] * scale, latent_hw[1] * scale, device=meta), config.patch_size
            )
            out = vae.quant_conv(vae.encoder(x, feat_cache=cache, feat_idx=[0]))
            if tuple(out.shape[2:]) != (1, *latent_hw):
                raise RuntimeError(f"VAE encoder chunk {k}: latent {tuple(out.shape)}, expected 1 frame of {latent_hw}")
            after = tuple(_describe(e, latent_hw) for e in cache)
            layouts.append(EncoderPhaseLayout(k, frames, before, after, 3, scale, int(config.z_dim)))
            if k > 0 and after == before:
                return layouts
    raise RuntimeError(f"the VAE encoder cache did not reach a steady structure within {MAX_PHASES} chunks")


def encoder_layouts_from_config(vae_config: dict[str, Any]) -> list[EncoderPhaseLayout]:
    return trace_encoder_layouts(_meta_vae(vae_config))


class VaeEncoderPhase(nn.Module):
    """One encoder phase: `forward(video_chunk, *cache) -> (latent_mean, *new_cache)`.

    `video_chunk` is [1, 3, frames, H, W] in [-1, 1] as `vae.encode` takes it (patchified here for the Wan2.2 VAE);
    `latent_mean` is that chunk's latent frame, the posterior's mean (what diffusers' `retrieve_latents(...,
    sample_mode="argmax")` returns), [1, z_dim, 1, h, w]."""

    def __init__(self, vae: nn.Module, layout: EncoderPhaseLayout) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.layout = layout
        self.patch_size = vae.config.patch_size
        self.eval()

    def forward(self, video_chunk: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layout = self.layout
        feat_cache = _cache_in("VAE encoder phase", layout, cache)
        out = self.quant_conv(
            self.encoder(_patchify(video_chunk, self.patch_size), feat_cache=feat_cache, feat_idx=[0])
        )
        return (out[:, : layout.latent_channels], *_cache_out("VAE encoder phase", layout, feat_cache))


def build_encoder_phase_modules(vae: nn.Module) -> list[VaeEncoderPhase]:
    return [VaeEncoderPhase(vae, layout) for layout in trace_encoder_layouts(vae)]


def encode_video(run_phase: RunPhase, video: torch.Tensor, num_phases: int) -> torch.Tensor:
    """Encode a [1, 3, F, H, W] video in [-1, 1] (F = 1 + 4k) into the posterior mean [1, z_dim, 1 + k, h, w], chunk
    by chunk as `AutoencoderKLWan._encode` does: `run_phase(k, [video_chunk, *cache])` -> `[latent, *new_cache]`."""
    if video.ndim != 5 or video.shape[0] != 1 or (video.shape[2] - 1) % ENCODER_CHUNK_FRAMES:
        raise ValueError(f"expected a video [1, 3, 1 + {ENCODER_CHUNK_FRAMES}k, H, W], got {tuple(video.shape)}")
    cache: list[torch.Tensor] = []
    latents = []
    starts = [0, *range(1, video.shape[2], ENCODER_CHUNK_FRAMES)]
    for i, start in enumerate(starts):
        stop = 1 if i == 0 else start + ENCODER_CHUNK_FRAMES
        outputs = run_phase(min(i, num_phases - 1), [video[:, :, start:stop].contiguous(), *cache])
        latents.append(outputs[0])
        cache = list(outputs[1:])
    return torch.cat(latents, dim=2)


class EngineVaeEncoder(EnginePhases):
    """The encoder's phase graphs run through engines, like `EngineVaeDecoder`."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return encode_video(self._run, video, len(self.engines))


def encoder_graph_path(artifacts: Path, k: int) -> Path:
    return artifacts / f"vae_encoder_phase{k}.onnx"


def onnx_vae_encode_fn(
    artifacts: Path, make_engine: Callable[[Path], Engine]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`encode(video) -> latent mean` over the exported `vae_encoder_phase{k}.onnx` graphs in `artifacts`."""
    paths = phase_graphs(artifacts, encoder_graph_path, "VAE encoder")
    return EngineVaeEncoder([make_engine(p) for p in paths]).encode
