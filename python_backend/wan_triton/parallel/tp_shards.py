"""Build-time tensor-parallel shards of the experts: one safetensors file per tp rank and a manifest.

    <folder>/manifest.json
    <folder>/<expert>/tp<j>-of-<tp>.safetensors

A worker of tp rank j loads only its file (1/tp of the attention and FFN weights plus the small replicated
rest), not the whole expert. The manifest records the plan, the dtypes and the source checkpoint (a SHA-256 of
the expert's weight files, computed at build, and a cheap fingerprint of their headers, sizes and config checked
at every load); a loader refuses a manifest whose plan or checkpoint differs from the deployment's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path
from typing import Any

import torch

from wan_triton.config.plan import ParallelPlan, PlanError
from wan_triton.config.precision import DTYPES
from wan_triton.model.checkpoint import EXPERTS, Checkpoint
from wan_triton.parallel.sharding import shard_tensor_parallel

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# (pattern, dim): the tensors that tp splits and along which dimension; everything else is replicated.
# Column-parallel layers split their output features (dim 0, weight and bias); row-parallel layers split their
# input features (dim 1 of the weight; the bias stays whole and is added once after the all-reduce).
TP_RULES: list[tuple[re.Pattern[str], int]] = [
    (re.compile(r"blocks\.\d+\.attn[12]\.to_[qkv]\.(weight|bias)$"), 0),
    (re.compile(r"blocks\.\d+\.attn[12]\.norm_[qk]\.weight$"), 0),
    (re.compile(r"blocks\.\d+\.attn[12]\.to_out\.0\.weight$"), 1),
    (re.compile(r"blocks\.\d+\.ffn\.net\.0\.proj\.(weight|bias)$"), 0),
    (re.compile(r"blocks\.\d+\.ffn\.net\.2\.weight$"), 1),
]


def split_dim(name: str) -> int | None:
    for pattern, dim in TP_RULES:
        if pattern.search(name):
            return dim
    return None


def _keep_fp32(name: str) -> bool:
    # diffusers keeps these WanTransformer3DModel modules in float32 whatever the load dtype.
    from diffusers import WanTransformer3DModel

    return any(part in WanTransformer3DModel._keep_in_fp32_modules for part in name.split("."))


def shard_folder_name(plan: ParallelPlan, precision: str) -> str:
    return f"tp{plan.tp}-{precision}"


def _weight_files(ckpt: Checkpoint, expert: str) -> list[Path]:
    files = sorted((ckpt.root / expert).glob("*.safetensors"))
    if not files:
        raise PlanError(f"{ckpt.root / expert}: no .safetensors weights to shard")
    return files


def fingerprint(ckpt: Checkpoint, expert: str) -> str:
    """Cheap identity of an expert's weights: config, and each file's name, size and safetensors header (tensor
    names, dtypes, shapes, offsets). Checked at every load; the full SHA-256 is recorded at build."""
    h = hashlib.sha256((ckpt.root / expert / "config.json").read_bytes())
    for path in _weight_files(ckpt, expert):
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(path.name.encode() + str(path.stat().st_size).encode() + f.read(header_len))
    return h.hexdigest()


def content_sha256(ckpt: Checkpoint, expert: str) -> str:
    h = hashlib.sha256()
    for path in _weight_files(ckpt, expert):
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def write_tp_shards(ckpt: Checkpoint, plan: ParallelPlan, precision: str, out: Path) -> Path:
    """Write every expert's tp shards (read lazily, tensor by tensor) and the manifest; returns the folder."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if plan.tp == 1:
        raise PlanError("no tensor-parallel shards for tp = 1")
    dtype = DTYPES[precision]
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "plan": plan.model_dump(),
        "tp": plan.tp,
        "precision": precision,
        "source": {"checkpoint": str(ckpt.root)},
        "experts": {},
    }
    for expert in filter(ckpt.has_expert, EXPERTS):
        plan.check_transformer(ckpt.config(expert))
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(plan.tp)]
        dtypes: dict[str, int] = {}
        for path in _weight_files(ckpt, expert):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    target = torch.float32 if _keep_fp32(name) else dtype
                    dim = split_dim(name)
                    if dim is None:
                        whole = f.get_tensor(name).to(target).contiguous()
                        for shard in shards:
                            shard[name] = whole
                    else:
                        lazy = f.get_slice(name)
                        size = lazy.get_shape()[dim]
                        if size % plan.tp:
                            raise PlanError(f"{expert}.{name}: dim {dim} of size {size} not divisible by tp {plan.tp}")
                        step = size // plan.tp
                        for j, shard in enumerate(shards):
                            index = (slice(None),) * dim + (slice(j * step, (j + 1) * step),)
                            shard[name] = lazy[index].to(target).contiguous()
                    dtypes[str(target).removeprefix("torch.")] = dtypes.get(str(target).removeprefix("torch."), 0) + 1
        (out / expert).mkdir(exist_ok=True)
        files = []
        for j, shard in enumerate(shards):
            file = out / expert / f"tp{j}-of-{plan.tp}.safetensors"
            save_file(shard, str(file), metadata={"tp_rank": str(j), "tp": str(plan.tp)})
            files.append(str(file.relative_to(out)))
        manifest["experts"][expert] = {
            "files": files,
            "tensor_dtypes": dtypes,
            "source_sha256": content_sha256(ckpt, expert),
            "source_fingerprint": fingerprint(ckpt, expert),
        }
        logger.info("%s: wrote %d tp shards to %s", expert, plan.tp, out / expert)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def read_manifest(folder: Path, ckpt: Checkpoint, plan: ParallelPlan, precision: str) -> dict[str, Any]:
    """The folder's manifest, refused unless it was built for this plan's tp, this precision and checkpoint."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    problems = []
    if manifest.get("format") != FORMAT_VERSION:
        problems.append(f"format {manifest.get('format')} (expected {FORMAT_VERSION})")
    built = ParallelPlan.model_validate(manifest["plan"])
    if built != plan:
        problems.append(f"built for plan {built}, the deployment runs {plan}")
    if manifest.get("precision") != precision:
        problems.append(f"built in {manifest.get('precision')}, the deployment runs {precision}")
    for expert in filter(ckpt.has_expert, EXPERTS):
        entry = manifest["experts"].get(expert)
        if entry is None:
            problems.append(f"no shards of {expert}")
        elif entry["source_fingerprint"] != fingerprint(ckpt, expert):
            problems.append(f"{expert} was built from other weights than {ckpt.root / expert}")
    if problems:
        raise PlanError(f"{folder / MANIFEST}: refusing the tensor-parallel shards: " + "; ".join(problems))
    return manifest


def find_shards(artifacts: Path, ckpt: Checkpoint, plan: ParallelPlan, precision: str = "float32") -> Path | None:
    """The shard folder rendered into a model's version folder for this plan (checked), or None when the plan
    needs none (tp = 1) or none was built (each worker then cuts the whole expert at load)."""
    folder = artifacts / shard_folder_name(plan, precision)
    others = [m.parent for m in artifacts.glob(f"*/{MANIFEST}") if m.parent != folder]
    if others and not (folder / MANIFEST).is_file():
        built = [json.loads((o / MANIFEST).read_text(encoding="utf-8")) for o in others]
        raise PlanError(
            f"{artifacts}: the repository was built with tp shards for "
            + ", ".join(f"plan {ParallelPlan.model_validate(m['plan'])} in {m['precision']}" for m in built)
            + f", the deployment runs {plan} in {precision}; re-run `make build`"
        )
    if plan.tp == 1:
        return None
    if not (folder / MANIFEST).is_file():
        logger.warning("%s: no build-time tp shards; every worker loads the whole experts and cuts them", folder)
        return None
    read_manifest(folder, ckpt, plan, precision)
    return folder


def load_rank_shard(ckpt: Checkpoint, expert: str, folder: Path, groups, dtype: torch.dtype, device: torch.device):
    """A WanTransformer3DModel holding only this tp rank's shard: built without weights, sharded in structure,
    then filled from the rank's file (strict: every tensor present, none extra)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    config = WanTransformer3DModel.load_config(ckpt.root / expert)
    with init_empty_weights(include_buffers=False):  # parameters on "meta", rotary tables real
        module = WanTransformer3DModel.from_config(config)
    shard_tensor_parallel(module, groups.coords.tp, groups.plan.tp, groups.tp)
    file = folder / expert / f"tp{groups.coords.tp}-of-{groups.plan.tp}.safetensors"
    state = load_file(str(file), device=str(device))
    module.load_state_dict(state, strict=True, assign=True)
    module._wan_tp_sharded = True
    logger.info("rank %d: loaded %s tp shard %s (%s)", groups.rank, expert, file.name, dtype)
    return module.to(device).eval()
