"""LoRA adapters fused into an expert's weights, exactly as diffusers' `WanPipeline` applies them.

A file is read only if it is a safetensors file (its header is checked, whatever its name), then converted by
diffusers' own Wan LoRA loader (`WanLoraLoaderMixin.lora_state_dict`: diffusers/PEFT keys as they are; the original
Wan, ComfyUI and LightX2V keys, `lora_down`/`lora_up`/`alpha`, `diff_b` bias deltas and `head.head.diff`,
converted), loaded with `load_lora_adapter` (which honours the rank/alpha metadata diffusers writes into the
header), weighted with `set_adapters`, fused with `fuse_lora` and unloaded: the expert keeps plain Linear layers
with the sum of the weight changes in them, and runs at the speed it had without adapters.

`check_adapter` refuses, before anything is built, a file whose converted keys do not all name a Linear layer of
the expert with fitting shapes: an adapter made for another model must not half-apply.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from wan_triton.config.deployment import LoraConfig

logger = logging.getLogger(__name__)

# diffusers' load_lora_adapter keeps the keys under this prefix (the pipeline's `transformer` component).
PREFIX = "transformer."
# A safetensors header is JSON of at most 100 MB (the format's own limit).
MAX_HEADER_BYTES = 100_000_000
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")


class LoraError(ValueError):
    """An adapter file that cannot be applied to the expert; the message names the file and the problem."""


@dataclass(frozen=True)
class Adapter:
    """One file after diffusers' conversion: the keys it applies (with the `transformer.` prefix) and what it drops."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict | None
    dropped: list[str] = field(default_factory=list)


def check_safetensors(path: Path) -> None:
    """Raise LoraError unless `path` is a safetensors file: an 8-byte little-endian header length, then that many
    bytes of JSON, within the file (a pickle or anything else fails here, before any loader sees it)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if header_len is None or not 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8):
                raise LoraError(f"{path}: not a safetensors file (no valid header); only safetensors is read")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise LoraError(f"{path}: LoRA file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraError(f"{path}: not a safetensors file (its header is not JSON); only safetensors is read") from None
    if not isinstance(header, dict):
        raise LoraError(f"{path}: not a safetensors file (its header is not a JSON object)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _diffusers_log() -> Iterator[list[str]]:
    """What diffusers' converter says while it runs (it logs the keys it drops on purpose), collected here instead
    of printed, to be listed once in this module's log."""
    handler = _Records()
    names = ("diffusers.loaders.lora_conversion_utils", "diffusers.loaders.lora_pipeline")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    try:
        yield handler.messages
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


def read_adapter(path: str | Path) -> Adapter:
    """The file converted by diffusers' Wan LoRA loader. Raises LoraError naming the file."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: LoRA file not found")
    check_safetensors(path)
    with _diffusers_log() as messages:
        try:
            state_dict, metadata = WanLoraLoaderMixin.lora_state_dict(
                str(path), use_safetensors=True, return_lora_metadata=True
            )
        except Exception as exc:  # noqa: BLE001 - the converter raises bare errors on keys it does not know
            raise LoraError(f"{path}: diffusers' Wan LoRA loader cannot convert it: {exc!r}") from exc
    # WanPipeline.load_lora_weights refuses such a file outright.
    not_lora = [k for k in state_dict if "lora" not in k]
    if not_lora:
        raise LoraError(f"{path}: key {not_lora[0]!r} is not a LoRA weight ({len(not_lora)} such keys)")
    kept = {k: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    dropped = [f"{k} (not under {PREFIX!r}; diffusers loads only those)" for k in state_dict if k not in kept]
    dropped += [f"diffusers: {m}" for m in messages if "remov" in m.lower() or "not handle" in m.lower()]
    return Adapter(path, kept, metadata, dropped)


def linear_shapes(module: nn.Module) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every Linear layer by module name (works on a meta-device module)."""
    return {name: (m.in_features, m.out_features) for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def check_adapter(adapter: Adapter, shapes: dict[str, tuple[int, int]], expert: str) -> int:
    """Raise LoraError unless every converted key is a LoRA A/B weight or bias delta of a Linear layer of the expert
    whose shapes fit, and A and B agree on the rank. Returns the number of layers the adapter changes."""
    where = f"{adapter.path} ({expert})"
    if not adapter.state_dict:
        raise LoraError(
            f"{where}: no key applies to the expert after diffusers' conversion (dropped: {adapter.dropped[:5]})"
        )
    layers: dict[str, dict[str, torch.Size]] = {}
    for key, tensor in adapter.state_dict.items():
        match = _KEY.match(key.removeprefix(PREFIX))
        if match is None:
            raise LoraError(f"{where}: key {key!r} is not a LoRA A/B weight or bias delta")
        layers.setdefault(match["module"], {})[match["part"]] = tensor.shape
    for name, parts in layers.items():
        if name not in shapes:
            raise LoraError(f"{where}: key {PREFIX}{name}.* matches no Linear layer of the expert")
        in_features, out_features = shapes[name]
        a, b, bias = parts.get("lora_A.weight"), parts.get("lora_B.weight"), parts.get("lora_B.bias")
        if a is None or b is None:
            raise LoraError(f"{where}: layer {name} has {sorted(parts)} but needs both lora_A and lora_B weights")
        if len(a) != 2 or len(b) != 2 or a[1] != in_features or b[0] != out_features or a[0] != b[1]:
            raise LoraError(
                f"{where}: layer {name}: lora_A {tuple(a)} / lora_B {tuple(b)} do not fit the layer "
                f"({in_features} in, {out_features} out) with one rank"
            )
        if bias is not None and tuple(bias) != (out_features,):
            raise LoraError(f"{where}: layer {name}: bias delta {tuple(bias)} does not fit {out_features} outputs")
    return len(layers)


def meta_expert(config: dict) -> nn.Module:
    """The expert built on the meta device from its config (shapes only, no memory)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel.from_config(config)


def validate(loras: Sequence[LoraConfig], configs: dict[str, dict]) -> None:
    """Check each LoRA against each expert it applies to (`configs`: expert name -> transformer config), and log
    what diffusers' conversion drops. Raises LoraError naming the file and the problem."""
    for lora in loras:
        if not any(lora.applies_to(expert) for expert in configs):
            raise LoraError(f"{lora.path}: expert {lora.expert!r} is not in the checkpoint (it has {sorted(configs)})")
    for expert, config in configs.items():
        selected = [lora for lora in loras if lora.applies_to(expert)]
        if not selected:
            continue
        shapes = linear_shapes(meta_expert(config))
        for lora in selected:
            adapter = read_adapter(lora.path)
            layers = check_adapter(adapter, shapes, expert)
            logger.info("LoRA %s on %s: %d layers, scale %g", adapter.path.name, expert, layers, lora.scale)
            for key in adapter.dropped:
                logger.info("LoRA %s on %s: dropped as diffusers drops it: %s", adapter.path.name, expert, key)


def fuse(module: nn.Module, loras: Sequence[LoraConfig], expert: str) -> nn.Module:
    """Fuse the LoRAs that apply to `expert` into `module`'s weights, in order, as diffusers does (see the module
    docstring); a file whose SHA-256 differs from the one the build recorded is refused."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    selected = [lora for lora in loras if lora.applies_to(expert)]
    if not selected:
        return module
    names = []
    shapes = linear_shapes(module)
    for index, lora in enumerate(selected):
        path = Path(lora.path)
        if lora.sha256 is not None and file_sha256(path) != lora.sha256:
            raise LoraError(f"{path}: changed since the build (SHA-256 differs from {lora.sha256}); run `make build`")
        adapter = read_adapter(path)
        check_adapter(adapter, shapes, expert)
        state_dict = WanLoraLoaderMixin._maybe_expand_t2v_lora_for_i2v(module, dict(adapter.state_dict))
        name = f"lora_{index}"
        module.load_lora_adapter(state_dict, prefix=PREFIX[:-1], adapter_name=name, metadata=adapter.metadata)
        names.append(name)
    module.set_adapters(names, weights=[lora.scale for lora in selected])
    module.fuse_lora(adapter_names=names)
    module.unload_lora()
    logger.info("%s: fused %d LoRA(s): %s", expert, len(selected), [Path(lora.path).name for lora in selected])
    return module
