"""`make build`: checkpoint -> exported graphs (checked against PyTorch) -> rendered Triton model repository.

    python -m wan_build --model CKPT_DIR|tiny --deployment DEPLOYMENT.yaml --repo REPO_DIR [--artifacts DIR]

`--model tiny` makes the embedded default: a tiny random-weight T2V checkpoint with the real architecture;
`tiny-i2v` and `tiny-ti2v` the same for the I2V-A14B and TI2V-5B architectures. The kind of a checkpoint is read
from the checkpoint itself.
Graphs are exported only for components whose deployment engine is onnxruntime (or tensorrt, whose plans are
built from the same ONNX graphs), and skipped when already exported from the same checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

from wan_triton.config.deployment import Deployment, EngineKind
from wan_triton.model import lora
from wan_triton.model.checkpoint import EXPERTS, Checkpoint, CheckpointError
from wan_triton.model.specs import ShapeLimits

from .render import RenderError, render_repository
from .tiny_model import Kind, TinyConfig, make_tiny_checkpoint

logger = logging.getLogger("wan_build")

# Deployment component -> the graphs export_onnx writes for it (those the checkpoint has: see `exported_graphs`).
EXPORTED_COMPONENTS = {
    "text_encoder": ["text_encoder"],
    "denoiser": ["transformer", "transformer_2"],
    "vae_decoder": ["vae"],
    "vae_encoder": ["vae_encoder"],
}


def exported_graphs(deployment: Deployment, ckpt: Checkpoint) -> list[str]:
    """The graphs to export: components not on the torch engine, and of those only what the checkpoint has (one
    expert for TI2V-5B; the VAE encoder only where requests carry images)."""
    from .export_onnx import checkpoint_components

    present = set(checkpoint_components(ckpt))
    return [
        graph
        for component, names in EXPORTED_COMPONENTS.items()
        if getattr(deployment.components, component).engine != EngineKind.TORCH
        for graph in names
        if graph in present
    ]


def shape_limits(deployment: Deployment) -> ShapeLimits:
    lim, d = deployment.limits, deployment.defaults
    return ShapeLimits(
        max_height=lim.max_height,
        max_width=lim.max_width,
        max_num_frames=lim.max_num_frames,
        opt_height=deployment.opt_height or d.height,
        opt_width=deployment.opt_width or d.width,
        opt_num_frames=deployment.opt_num_frames or d.num_frames,
    )


# `--model` names for the tiny random-weight checkpoints of each kind.
TINY_MODELS: dict[str, Kind] = {"tiny": "t2v", "tiny-i2v": "i2v", "tiny-ti2v": "ti2v"}


def resolve_model(model: str, artifacts_root: Path) -> Path:
    if model not in TINY_MODELS:
        return Path(model)
    kind = TINY_MODELS[model]
    path = artifacts_root / ("tiny" if kind == "t2v" else model) / "checkpoint"
    if not (path / "model_index.json").is_file():
        make_tiny_checkpoint(path, TinyConfig(kind=kind))
    return path


def default_artifacts(ckpt: Checkpoint, artifacts_root: Path) -> Path:
    # One folder per checkpoint path, so two checkpoints never share exported graphs.
    digest = hashlib.sha256(str(ckpt.root).encode()).hexdigest()[:10]
    return artifacts_root / "onnx" / f"{ckpt.root.name}-{digest}"


def build_tp_shards(deployment: Deployment, ckpt: Checkpoint, artifacts: Path) -> None:
    """Validate the denoiser's parallel plan against the checkpoint; with tp > 1 cut each expert into per-rank
    files (skipped when already cut from the same weights for the same plan and precision)."""
    from wan_triton.parallel.tp_shards import read_manifest, shard_folder_name, write_tp_shards

    cfg = deployment.components.denoiser
    plan = cfg.parallel
    for expert in filter(ckpt.has_expert, EXPERTS):
        plan.check_transformer(ckpt.config(expert), cfg.ulysses_head_groups)
    if plan.tp == 1:
        return
    if ckpt.random_weights:
        logger.warning("random-weight checkpoint: no tp shards; each worker builds its own part")
        return
    folder = artifacts / shard_folder_name(plan, cfg.precision)
    try:
        read_manifest(folder, ckpt, plan, cfg.precision)
        logger.info("tp shards in %s are up to date", folder)
    except (FileNotFoundError, ValueError):
        write_tp_shards(ckpt, plan, cfg.precision, folder)


def build_fp8_weights(deployment: Deployment, ckpt: Checkpoint, artifacts: Path) -> None:
    """At `precision: fp8`, quantize the experts' block linear layers once into safetensors (skipped when already
    done from the same weights); a configs-only checkpoint's random weights are quantized at load instead."""
    from wan_triton.runtime.fp8_weights import FOLDER, read_manifest, write_fp8_weights

    if deployment.components.denoiser.precision != "fp8":
        return
    if ckpt.random_weights:
        logger.warning("random-weight checkpoint: no build-time FP8 weights; the experts are quantized at load")
        return
    if deployment.components.denoiser.parallel.tp > 1:
        # The stored weights are of whole layers; a tp rank quantizes its own bf16 shard (parallel.sharding).
        logger.info("plan with tp: no build-time FP8 weights; each rank quantizes its shard at load")
        return
    folder = artifacts / FOLDER
    try:
        read_manifest(folder, ckpt)
        logger.info("FP8 weights in %s are up to date", folder)
    except (FileNotFoundError, ValueError):
        write_fp8_weights(ckpt, folder)


def resolve_loras(deployment: Deployment, ckpt: Checkpoint) -> Deployment:
    """The deployment with each LoRA's absolute path and SHA-256 recorded, after checking every file against the
    experts it applies to (raises LoraError naming the file and the problem)."""
    cfg = deployment.components.denoiser
    if not cfg.loras:
        return deployment
    loras = tuple(item.model_copy(update={"path": str(Path(item.path).resolve())}) for item in cfg.loras)
    lora.validate(loras, {expert: ckpt.config(expert) for expert in EXPERTS if ckpt.has_expert(expert)})
    loras = tuple(item.model_copy(update={"sha256": lora.file_sha256(Path(item.path))}) for item in loras)
    denoiser = cfg.model_copy(update={"loras": loras})
    components = deployment.components.model_copy(update={"denoiser": denoiser})
    return deployment.model_copy(update={"components": components})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wan_build", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="checkpoint directory in the Diffusers layout, or tiny, tiny-i2v, tiny-ti2v"
    )
    parser.add_argument("--deployment", type=Path, required=True)
    parser.add_argument("--repo", type=Path, required=True, help="model repository to write")
    parser.add_argument("--artifacts-root", type=Path, default=Path("artifacts"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        deployment = Deployment.load(args.deployment)
        ckpt = Checkpoint.open(resolve_model(args.model, args.artifacts_root))
        deployment = resolve_loras(deployment, ckpt)
        ckpt = Checkpoint.open(ckpt.root, deployment.components.denoiser.loras, deployment.scheduler)
        solver = ckpt.make_solver()  # a bad `scheduler` override fails here, before anything is written
        logger.info("solver: %s", type(solver).__name__)
        artifacts = default_artifacts(ckpt, args.artifacts_root)
        graphs = exported_graphs(deployment, ckpt)
        logger.info("checkpoint %s: Wan2.2 %s (image input: %s)", ckpt.root, ckpt.kind, ckpt.image_input)
        if graphs:
            from .export_onnx import export_all, format_table

            rows = export_all(ckpt, shape_limits(deployment), artifacts, components=graphs)
            print(format_table(rows))
            failed = [row.component for row in rows if not row.ok]
            if failed:
                raise ValueError(f"exported graphs differ from PyTorch beyond tolerance: {failed}")
        if deployment.components.vae_decoder.split_width > 1 and ckpt.config("vae").get("patch_size") is not None:
            raise ValueError("vae_decoder split_width > 1 supports the Wan2.1 VAE, not this Wan2.2 VAE")
        build_tp_shards(deployment, ckpt, artifacts)
        build_fp8_weights(deployment, ckpt, artifacts)
        repo = render_repository(deployment, ckpt.root, artifacts, args.repo)
    except (CheckpointError, RenderError, ValueError, FileNotFoundError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"model repository: {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
