"""Export the text encoder, the denoiser experts and the VAE decoder (and encoder) phases to ONNX, then check them.

Every graph's tensor names, dtypes and dynamic dims come from `wan_triton.model.specs`. The dynamo exporter is used
throughout (Wan's rotary embedding keeps dynamic shapes only through it) and it silently pins dims it cannot
prove dynamic, so each exported graph is reloaded and its input/output dims compared with the spec: symbolic
exactly where the spec names a dim, else an error. Each graph is then run in ONNX Runtime at the spec's min shape
(not the export example's) and compared with PyTorch; the figures come back as `CheckRow`s and are written to
`<out>/onnx_check.json`.

Re-running is cheap: a component whose graphs exist and whose recorded source hash (checkpoint config and weight
files, spec, exporter versions) still matches is skipped and its recorded check rows are reused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.export import Dim

try:
    import wan_triton  # noqa: F401
except ImportError:  # run from a source checkout: the serving library sits next to build/
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python_backend"))

from wan_triton.model import lora
from wan_triton.model.checkpoint import EXPERTS, MAX_SEQUENCE_LENGTH, Checkpoint
from wan_triton.model.denoise import call_transformer
from wan_triton.model.specs import (
    ComponentSpec,
    DimRange,
    ShapeLimits,
    denoiser_spec,
    text_encoder_spec,
    vae_decoder_phase_specs,
    vae_encoder_phase_specs,
)
from wan_triton.model.vae_chunks import (
    ENCODER_CHUNK_FRAMES,
    EngineVaeDecoder,
    EngineVaeEncoder,
    RunPhase,
    build_encoder_phase_modules,
    build_phase_modules,
    decode_latents,
    encode_video,
    encoder_graph_path,
    phase_graph_path,
)
from wan_triton.runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

logger = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", *EXPERTS, "vae", "vae_encoder")
# Bump when a change here changes the exported graphs, so earlier artifacts stop matching.
EXPORT_FORMAT = 1
# Protobuf caps a file at 2 GiB; weights past this size go to `<graph>.onnx.data` instead.
EXTERNAL_DATA_BYTES = 1536 * 2**20
# Weight files up to this size are hashed by content; larger ones by size and mtime (hashing 28 GB is too slow).
CONTENT_HASH_BYTES = 64 * 2**20
# fp32 graphs vs PyTorch: only reordered float arithmetic should differ.
REL_L2_TOLERANCE = 1e-4
SOURCES_FILE = "onnx_sources.json"
CHECK_FILE = "onnx_check.json"


class ExportError(RuntimeError):
    """An exported graph does not match its spec."""


@dataclass(frozen=True)
class CheckRow:
    """ONNX Runtime vs PyTorch for one graph (or the chunked VAE decode as a whole)."""

    component: str
    shape: str  # the checked input shape, e.g. "hidden_states=1x16x1x2x2"
    max_abs: float
    rel_l2: float
    export_s: float | None = None  # seconds the export took; None for a row that checks several graphs
    reused: bool = False  # the graph was up to date and not exported in this run
    rel_l2_tolerance: float = REL_L2_TOLERANCE

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_abs) and self.rel_l2 < self.rel_l2_tolerance


@dataclass
class _Graph:
    """One graph to export: the module, its spec and the example inputs torch.export traces with."""

    spec: ComponentSpec
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    file: str


# ---------------------------------------------------------------------------------------------------------------
# Example shapes and dynamic dims


def _example_dim(name: str, r: DimRange, patch: tuple[int, int]) -> int:
    """An export example size: >= 2 (torch.export specializes sizes 0 and 1), distinct per dim so that no two dims
    are unified by coincidence, and valid (latent height/width are multiples of the patch)."""
    preferred = {"batch": 2, "latent_frames": 3, "latent_height": 2 * patch[0], "latent_width": 3 * patch[1]}
    return max(preferred.get(name, 5), r.min)


def _export_dims(spec: ComponentSpec, patch: tuple[int, int]) -> tuple[dict[str, int], dict[str, object]]:
    """Example sizes and torch.export dims for every dim the spec names.

    Names `<base>_x<k>` (see `specs._scaled`) are exported as k * <base>, so torch.export knows how the VAE's cache
    and video sizes relate to the latent size instead of having to prove it.
    """
    values: dict[str, int] = {}
    dims: dict[str, object] = {}
    for name, r in spec.dims.items():
        base, _, scale = name.partition("_x")
        if scale:
            continue
        values[name] = _example_dim(name, r, patch)
        # The range only bounds what torch.export may assume (ONNX dims carry no range); widen it to hold the
        # example when a deployment's limits are smaller than the example.
        dims[name] = Dim(name, min=r.min, max=max(r.max, values[name]))
    for name in spec.dims:
        base, _, scale = name.partition("_x")
        if scale:
            values[name] = values[base] * int(scale)
            dims[name] = dims[base] * int(scale)  # type: ignore[operator]
    return values, dims


def _shape(shape: tuple[int | str, ...], values: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else values[d] for d in shape)


def _dynamic_shapes(spec: ComponentSpec, dims: dict[str, object], varargs: bool) -> tuple:
    per_input = [{i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs]
    if varargs:
        # VaeDecoderPhase.forward(latent, *cache): torch.export sees the varargs as one tuple argument.
        return (per_input[0], tuple(per_input[1:])) if len(per_input) > 1 else (per_input[0],)
    return tuple(per_input)


def _text_inputs(batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a padding mask like the tokenizer's: a prefix of real tokens, the rest padding (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, MAX_SEQUENCE_LENGTH), generator=g)
    lengths = torch.randint(1, MAX_SEQUENCE_LENGTH // 4, (batch,), generator=g)
    mask = (torch.arange(MAX_SEQUENCE_LENGTH)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def _random_inputs(spec: ComponentSpec, values: dict[str, int], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = _shape(t.shape, values)
        if t.dtype == "int64":  # the denoiser's timestep
            out.append(torch.randint(0, 1000, shape, generator=g))
        elif t.name == "timestep":  # per latent frame (expand_timesteps): float timesteps in the same range
            out.append(torch.randint(0, 1000, shape, generator=g).float())
        else:
            out.append(torch.randn(shape, generator=g, dtype=t.torch_dtype))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# Modules with the specs' signatures


class _TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Denoiser(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return call_transformer(self.model, hidden_states, timestep, encoder_hidden_states)


# ---------------------------------------------------------------------------------------------------------------
# Export and verification of one graph


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _export_graph(graph: _Graph, dims: dict[str, object], out_dir: Path, varargs: bool = False) -> float:
    """Export one graph to `out_dir/graph.file` and check its dims against the spec. Returns seconds taken."""
    spec = graph.spec
    external = _param_bytes(graph.module) > EXTERNAL_DATA_BYTES
    path = out_dir / graph.file
    t0 = time.perf_counter()
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            graph.module,
            graph.example,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec, dims, varargs),
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    seconds = time.perf_counter() - t0
    check_graph_dims(path, spec)
    logger.info("exported %s in %.1f s%s", graph.file, seconds, " (external data)" if external else "")
    return seconds


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter that says nothing about our graphs (one INFO line per deduplicated
    initializer, missing-torchvision notices, axis-renaming notes for dims the spec already names)."""
    levels = {
        "onnx_ir": logging.WARNING,
        "onnxscript": logging.WARNING,
        "onnxscript.optimizer": logging.ERROR,  # "Skipping constant folding for op Split ..."
        "torch.onnx._internal.exporter._registration": logging.ERROR,
    }
    saved = {name: logging.getLogger(name).level for name in levels}
    try:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*shares the same shape constraints", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _graph_dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    if not value.type.tensor_type.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        out.append(d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None)
    return out


def check_graph_dims(path: Path, spec: ComponentSpec) -> None:
    """Raise ExportError unless the graph's inputs/outputs carry the spec's names, and their dims are symbolic
    exactly where the spec names a dim and equal to the spec's size elsewhere."""
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    for kind, values, tensors in (
        ("input", model.graph.input, spec.inputs),
        ("output", model.graph.output, spec.outputs),
    ):
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            problems.append(f"{kind} names {names} != spec {[t.name for t in tensors]}")
            continue
        for value, tensor in zip(values, tensors, strict=True):
            dims = _graph_dims(value)
            if not dims and kind == "output":
                continue  # no shape inferred for an output: nothing pinned either
            if len(dims) != len(tensor.shape):
                problems.append(f"{kind} {value.name}: rank {len(dims)} != spec {tensor.shape}")
                continue
            for axis, (got, want) in enumerate(zip(dims, tensor.shape, strict=True)):
                if isinstance(want, str) and not isinstance(got, str):
                    problems.append(f"{kind} {value.name} axis {axis}: pinned to {got}, spec says dynamic {want!r}")
                elif isinstance(want, int) and got != want:
                    problems.append(f"{kind} {value.name} axis {axis}: {got!r}, spec says fixed {want}")
    if problems:
        raise ExportError(f"{path.name} does not match spec {spec.name}:\n  " + "\n  ".join(problems))


def _compare(component: str, shape: str, got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> CheckRow:
    if len(got) != len(ref):
        raise ExportError(f"{component}: {len(got)} outputs from ONNX Runtime, {len(ref)} from PyTorch")
    diff = np.concatenate([(g.double() - r.double()).flatten().numpy() for g, r in zip(got, ref, strict=True)])
    ref_all = np.concatenate([r.double().flatten().numpy() for r in ref])
    for g, r in zip(got, ref, strict=True):
        if g.shape != r.shape:
            raise ExportError(f"{component}: ONNX Runtime output {tuple(g.shape)} != PyTorch {tuple(r.shape)}")
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    rel_l2 = float(np.linalg.norm(diff) / max(np.linalg.norm(ref_all), 1e-30))
    return CheckRow(component, shape, max_abs, rel_l2)


def _shape_text(spec: ComponentSpec, inputs: Sequence[torch.Tensor]) -> str:
    # The first input carries every dynamic dim of these graphs.
    return f"{spec.inputs[0].name}={'x'.join(map(str, inputs[0].shape))}"


def _run_reference(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        ref = module(*inputs)
    return list(ref) if isinstance(ref, tuple) else [ref]


def _run_graph(path: Path, spec: ComponentSpec, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    out = OnnxRuntimeEngine(path).run(dict(zip(spec.input_names, inputs, strict=True)))
    return [out[name] for name in spec.output_names]


# ---------------------------------------------------------------------------------------------------------------
# Components


def _patch(ckpt: Checkpoint) -> tuple[int, int]:
    return ckpt.patch_size[1], ckpt.patch_size[2]


def _export_single(
    spec: ComponentSpec,
    load: Callable[[], nn.Module],
    example: tuple[torch.Tensor, ...],
    check_inputs: tuple[torch.Tensor, ...],
    dims: dict[str, object],
    out_dir: Path,
) -> CheckRow:
    """Export a one-graph component, then check it. The PyTorch reference runs first and the module is dropped
    before ONNX Runtime loads the graph, so a large model is never in memory twice."""
    module = load()
    path = out_dir / f"{spec.name}.onnx"
    seconds = _export_graph(_Graph(spec, module, example, path.name), dims, out_dir)
    ref = _run_reference(module, check_inputs)
    del module
    gc.collect()
    row = _compare(spec.name, _shape_text(spec, check_inputs), _run_graph(path, spec, check_inputs), ref)
    return dataclasses.replace(row, export_s=seconds)


def _export_text_encoder(ckpt: Checkpoint, limits: ShapeLimits, out_dir: Path) -> list[CheckRow]:
    spec = text_encoder_spec(ckpt)
    vocab = int(ckpt.config("text_encoder")["vocab_size"])
    values, dims = _export_dims(spec, _patch(ckpt))

    def load() -> nn.Module:
        # Eager attention: the dynamo exporter fails on UMT5 under SDPA.
        return _TextEncoder(ckpt.load_text_encoder(torch.float32, "cpu", eager_attention=True)).eval()

    example = _text_inputs(values["batch"], vocab, seed=0)
    check = _text_inputs(spec.dims["batch"].min, vocab, seed=1)
    return [_export_single(spec, load, example, check, dims, out_dir)]


def _export_expert(ckpt: Checkpoint, limits: ShapeLimits, out_dir: Path, name: str) -> list[CheckRow]:
    spec = denoiser_spec(ckpt, limits, name)
    values, dims = _export_dims(spec, _patch(ckpt))

    def load() -> nn.Module:
        return _Denoiser(ckpt.load_transformer(name, torch.float32, "cpu")).eval()

    example = _random_inputs(spec, values, seed=0)
    check = _random_inputs(spec, {d: r.min for d, r in spec.dims.items()}, seed=1)
    return [_export_single(spec, load, example, check, dims, out_dir)]


def _export_phases(
    ckpt: Checkpoint,
    specs: Sequence[ComponentSpec],
    modules: Sequence[nn.Module],
    graph_path: Callable[[Path, int], Path],
    out_dir: Path,
    run_chunks: Callable[[RunPhase], object],
) -> list[CheckRow]:
    """Exports each VAE phase module, then checks each graph on the very inputs its PyTorch phase sees while
    `run_chunks` runs the chunked decode or encode through the modules (one chunk per phase)."""
    seconds = []
    for k, (spec, module) in enumerate(zip(specs, modules, strict=True)):
        values, dims = _export_dims(spec, _patch(ckpt))
        graph = _Graph(spec, module, _random_inputs(spec, values, seed=k), graph_path(Path(), k).name)
        seconds.append(_export_graph(graph, dims, out_dir, varargs=True))

    phase_inputs: list[list[torch.Tensor]] = []

    def record(k: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        phase_inputs.append(tensors)
        with torch.no_grad():
            return list(modules[k](*tensors))

    run_chunks(record)
    rows = []
    for k, (spec, module) in enumerate(zip(specs, modules, strict=True)):
        inputs = tuple(phase_inputs[k])
        got = _run_graph(graph_path(out_dir, k), spec, inputs)
        row = _compare(spec.name, _shape_text(spec, inputs), got, _run_reference(module, inputs))
        rows.append(dataclasses.replace(row, export_s=seconds[k]))
    return rows


def _export_vae(ckpt: Checkpoint, limits: ShapeLimits, out_dir: Path) -> list[CheckRow]:
    specs = vae_decoder_phase_specs(ckpt, limits)
    vae = ckpt.load_vae(torch.float32, "cpu")
    modules = build_phase_modules(vae)
    if [m.layout.index for m in modules] != list(range(len(specs))):
        raise ExportError(f"VAE: {len(modules)} phase modules for {len(specs)} phase specs")
    h, w = specs[0].dims["latent_height"].min, specs[0].dims["latent_width"].min
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, int(ckpt.config("vae")["z_dim"]), len(specs), h, w, generator=g)
    rows = _export_phases(
        ckpt, specs, modules, phase_graph_path, out_dir, lambda run: decode_latents(run, latents, len(modules))
    )

    # End to end: the chunked decode through ONNX Runtime against diffusers' own `vae.decode`.
    with torch.no_grad():
        ref = vae.decode(latents).sample
    engines = [OnnxRuntimeEngine(phase_graph_path(out_dir, k)) for k in range(len(specs))]
    got = EngineVaeDecoder(engines, [(s.input_names, s.output_names) for s in specs]).decode(latents)
    rows.append(_compare("vae_decoder", f"latents={'x'.join(map(str, latents.shape))}", [got], [ref]))
    return rows


def _export_vae_encoder(ckpt: Checkpoint, limits: ShapeLimits, out_dir: Path) -> list[CheckRow]:
    specs = vae_encoder_phase_specs(ckpt, limits)
    vae = ckpt.load_vae(torch.float32, "cpu")
    modules = build_encoder_phase_modules(vae)
    if len(modules) != len(specs):
        raise ExportError(f"VAE encoder: {len(modules)} phase modules for {len(specs)} phase specs")
    scale = int(ckpt.config("vae").get("scale_factor_spatial", 8))
    h, w = specs[0].dims["latent_height"].min * scale, specs[0].dims["latent_width"].min * scale
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 1 + ENCODER_CHUNK_FRAMES * (len(specs) - 1), h, w, generator=g) * 2 - 1
    rows = _export_phases(
        ckpt, specs, modules, encoder_graph_path, out_dir, lambda run: encode_video(run, video, len(modules))
    )

    # End to end: the chunked encode through ONNX Runtime against diffusers' own `vae.encode` (posterior mean).
    with torch.no_grad():
        ref = vae.encode(video).latent_dist.mode()
    engines = [OnnxRuntimeEngine(encoder_graph_path(out_dir, k)) for k in range(len(specs))]
    got = EngineVaeEncoder(engines, [(s.input_names, s.output_names) for s in specs]).encode(video)
    rows.append(_compare("vae_encoder", f"video={'x'.join(map(str, video.shape))}", [got], [ref]))
    return rows


def _component_files(component: str, num_vae_phases: int) -> list[str]:
    if component == "vae":
        return [phase_graph_path(Path(), k).name for k in range(num_vae_phases)]
    if component == "vae_encoder":
        return [encoder_graph_path(Path(), k).name for k in range(num_vae_phases)]
    return [f"{component}.onnx"]


def _component_specs(ckpt: Checkpoint, limits: ShapeLimits, component: str) -> list[ComponentSpec]:
    if component == "text_encoder":
        return [text_encoder_spec(ckpt)]
    if component in EXPERTS:
        return [denoiser_spec(ckpt, limits, component)]
    if component == "vae_encoder":
        return vae_encoder_phase_specs(ckpt, limits)
    return vae_decoder_phase_specs(ckpt, limits)


_EXPORTERS: dict[str, Callable[[Checkpoint, ShapeLimits, Path], list[CheckRow]]] = {
    "text_encoder": _export_text_encoder,
    "transformer": lambda c, lim, out: _export_expert(c, lim, out, "transformer"),
    "transformer_2": lambda c, lim, out: _export_expert(c, lim, out, "transformer_2"),
    "vae": _export_vae,
    "vae_encoder": _export_vae_encoder,
}


# ---------------------------------------------------------------------------------------------------------------
# Idempotency


def source_hash(ckpt: Checkpoint, component: str, specs: Sequence[ComponentSpec]) -> str:
    """What the component's graphs are made from: its checkpoint folder, its specs, the exporter versions and, for
    an expert, the LoRAs fused into it (content hash, scale, expert) and the solver."""
    import onnxscript

    h = hashlib.sha256()
    meta = {
        "format": EXPORT_FORMAT,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "specs": [repr(s) for s in specs],
    }
    if component in EXPERTS:
        # The fused adapters are in the graph's weights; the solver is keyed too, so that a rebuild with another
        # one never reuses graphs checked under the old settings.
        meta["loras"] = [
            {"sha256": item.sha256 or lora.file_sha256(Path(item.path)), "scale": item.scale, "expert": item.expert}
            for item in ckpt.loras
            if item.applies_to(component)
        ]
        meta["solver"] = None if ckpt.solver is None else ckpt.solver.model_dump()
    h.update(json.dumps(meta, sort_keys=True).encode())
    folder = "vae" if component == "vae_encoder" else component  # both VAE halves come from vae/
    for f in sorted((ckpt.root / folder).iterdir()):
        if not f.is_file():
            continue
        stat = f.stat()
        h.update(f.name.encode())
        if f.suffix == ".json" or stat.st_size <= CONTENT_HASH_BYTES:
            h.update(hashlib.sha256(f.read_bytes()).digest())
        else:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def _load_sources(out_dir: Path) -> dict:
    path = out_dir / SOURCES_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        logger.warning("%s is unreadable; every component will be exported again", path)
        return {}


def _write_sources(out_dir: Path, sources: dict) -> None:
    (out_dir / SOURCES_FILE).write_text(json.dumps(sources, indent=2) + "\n", encoding="utf-8")


def _reusable_rows(out_dir: Path, recorded: dict, digest: str, files: list[str]) -> list[CheckRow] | None:
    """The recorded check rows if the component's graphs are present and made from the same sources, else None."""
    if recorded.get("hash") != digest or recorded.get("files") != files:
        return None
    if not all((out_dir / f).is_file() for f in files):
        return None
    try:
        return [CheckRow(**{**r, "reused": True}) for r in recorded["rows"]]
    except (KeyError, TypeError):  # recorded by an older version of this module
        return None


def _install(tmp: Path, out_dir: Path, component: str) -> None:
    """Move freshly exported files into place, removing the component's stale graphs (e.g. a phase count or an
    external-data file that no longer applies)."""
    patterns = {"vae": "vae_decoder_phase*.onnx*", "vae_encoder": "vae_encoder_phase*.onnx*"}
    pattern = patterns.get(component, f"{component}.onnx*")
    for stale in out_dir.glob(pattern):
        stale.unlink()
    for path in tmp.iterdir():
        path.replace(out_dir / path.name)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def checkpoint_components(ckpt: Checkpoint) -> list[str]:
    """The exportable components of this checkpoint."""

    def present(component: str) -> bool:
        if component in EXPERTS:
            return ckpt.has_expert(component)
        return component != "vae_encoder" or ckpt.image_input != "none"

    return [c for c in COMPONENTS if present(c)]


def export_all(
    ckpt: Checkpoint, limits: ShapeLimits, out_dir: Path, components: list[str] | None = None
) -> list[CheckRow]:
    """Export (or reuse) each component's graphs under `out_dir` and return the ONNX-vs-PyTorch check rows. By
    default every component the checkpoint has (the second expert of the A14B kinds, the VAE encoder where
    requests carry images)."""
    components = list(components or checkpoint_components(ckpt))
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; expected some of {COMPONENTS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = _load_sources(out_dir)
    rows: list[CheckRow] = []
    for component in components:
        specs = _component_specs(ckpt, limits, component)
        digest = source_hash(ckpt, component, specs)
        recorded = sources.get(component, {})
        files = _component_files(component, len(specs))
        reused = _reusable_rows(out_dir, recorded, digest, files)
        if reused is not None:
            logger.info("%s: graphs up to date, export skipped", component)
            rows += reused
            continue
        tmp = out_dir / f".export-{component}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            new_rows = _EXPORTERS[component](ckpt, limits, tmp)
            exported = sorted(p.name for p in tmp.glob("*.onnx"))
            if exported != sorted(files):
                raise ExportError(f"{component}: exported {exported}, expected {files}")
            # Forget the old record first: an interrupted install must not look up to date next time.
            sources.pop(component, None)
            _write_sources(out_dir, sources)
            _install(tmp, out_dir, component)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()  # the loaded torch modules can be large; free them before the next component
        sources[component] = {"hash": digest, "files": files, "rows": [dataclasses.asdict(r) for r in new_rows]}
        _write_sources(out_dir, sources)
        rows += new_rows
    _write_checks(out_dir, sources)
    return rows


def _write_checks(out_dir: Path, sources: dict) -> None:
    """All recorded check rows, including components not exported in this run."""
    rows = [r for component in COMPONENTS for r in sources.get(component, {}).get("rows", [])]
    (out_dir / CHECK_FILE).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def format_table(rows: Sequence[CheckRow]) -> str:
    lines = [f"{'component':<20} {'checked at':<34} {'max-abs':>10} {'rel-L2':>10} {'export s':>9}  ok"]
    for r in rows:
        export = "reused" if r.reused else "-" if r.export_s is None else f"{r.export_s:.1f}"
        ok = "yes" if r.ok else "NO"
        lines.append(f"{r.component:<20} {r.shape:<34} {r.max_abs:>10.2e} {r.rel_l2:>10.2e} {export:>9}  {ok}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--components", nargs="+", choices=COMPONENTS, default=None)
    parser.add_argument("--max-height", type=int, default=480)
    parser.add_argument("--max-width", type=int, default=832)
    parser.add_argument("--max-num-frames", type=int, default=81)
    parser.add_argument("--opt-height", type=int, default=None, help="defaults to --max-height")
    parser.add_argument("--opt-width", type=int, default=None, help="defaults to --max-width")
    parser.add_argument("--opt-num-frames", type=int, default=None, help="defaults to --max-num-frames")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    limits = ShapeLimits(
        max_height=args.max_height,
        max_width=args.max_width,
        max_num_frames=args.max_num_frames,
        opt_height=args.opt_height or args.max_height,
        opt_width=args.opt_width or args.max_width,
        opt_num_frames=args.opt_num_frames or args.max_num_frames,
    )
    rows = export_all(Checkpoint.open(args.checkpoint), limits, args.out_dir, args.components)
    logger.info("ONNX Runtime vs PyTorch:\n%s", format_table(rows))
    failed = [r.component for r in rows if not r.ok]
    if failed:
        logger.error("checks above tolerance (rel-L2 >= %g): %s", REL_L2_TOLERANCE, failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
