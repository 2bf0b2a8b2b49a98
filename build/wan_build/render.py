"""Render a Triton model repository from the templates in `model_repository/templates` and one deployment file.

Every model is rendered in one pass; a template key left unfilled, or a `${...}` left in the output, is an
error. The I/O sections and the ensemble's wiring come from `wan_triton.serving.model_io`, so names cannot
disagree between models. Exported graphs are linked into each model's version folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from string import Template

from wan_triton.config.deployment import (
    DEPLOYMENT_FILE,
    REPOSITORY_MARKER,
    ComponentConfig,
    Deployment,
    EngineKind,
    Serving,
)
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.serving import model_io

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parents[2] / "model_repository" / "templates"
MARKER = REPOSITORY_MARKER
VERSION = "1"
# With the result cache on, the ensemble holding the five steps and the cache: `<model_name>_pipeline`.
CACHED_PIPELINE = "pipeline"

# The Python-backend class of each role, in the module `wan_triton.serving.models.<role>` (model.py imports it).
CLASS_NAMES = {
    "preprocess": "Preprocess",
    "text_encoder": "TextEncoder",
    "scheduler": "Scheduler",
    "vae_decoder": "VaeDecoder",
    "postprocess": "Postprocess",
    "stream": "Stream",
}
# Which deployment component each step runs, and the exported graphs (globs) it needs with an ONNX engine.
STEP_COMPONENT = {"text_encoder": "text_encoder", "scheduler": "denoiser", "vae_decoder": "vae_decoder"}
STEP_GRAPHS = {
    "text_encoder": ["text_encoder.onnx*"],
    "scheduler": ["transformer.onnx*", "transformer_2.onnx*"],
    "vae_decoder": ["vae_decoder_phase*.onnx*"],
}
# The VAE encoder of condition images runs in the scheduler step.
VAE_ENCODER_GRAPHS = "vae_encoder_phase*.onnx*"


def step_graphs(deployment: Deployment, role: str, ckpt: Checkpoint) -> list[str]:
    """The exported graphs (globs) the step needs: its component's on an ONNX engine, only the experts the
    checkpoint has, and in the scheduler the VAE encoder's where requests carry images."""
    component = _component(deployment, role)
    patterns = []
    if component is not None and component.engine == EngineKind.ONNXRUNTIME:
        patterns += [p for p in STEP_GRAPHS[role] if p != "transformer_2.onnx*" or ckpt.has_expert("transformer_2")]
    encoder = deployment.components.vae_encoder
    if role == "scheduler" and encoder.engine == EngineKind.ONNXRUNTIME and ckpt.image_input != "none":
        patterns.append(VAE_ENCODER_GRAPHS)
    return patterns


GPU_INPUTS_PARAMETER = """parameters: {
  key: "FORCE_CPU_ONLY_INPUT_TENSORS"
  value: { string_value: "no" }
}"""


class RenderError(ValueError):
    pass


def fill(template_name: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template_name).read_text(encoding="utf-8")
    try:
        out = Template(text).substitute(values)
    except KeyError as exc:
        raise RenderError(f"template {template_name}: no value for key ${{{exc.args[0]}}}") from None
    except ValueError as exc:
        raise RenderError(f"template {template_name}: {exc}") from None
    leftover = re.findall(r"\$\{[^}]*\}", out)
    if leftover:
        raise RenderError(f"template {template_name}: unfilled keys {leftover}")
    return out


def _component(deployment: Deployment, role: str) -> ComponentConfig | None:
    name = STEP_COMPONENT.get(role)
    return None if name is None else getattr(deployment.components, name)


def _forward_step(target: str) -> str:
    """An ensemble step handing every request input to `target` and taking back every response output."""
    lines = [f'    model_name: "{target}"', "    model_version: -1"]
    lines += [f'    input_map {{ key: "{io.name}" value: "{io.name}" }}' for io in model_io.REQUEST_INPUTS]
    lines += [f'    output_map {{ key: "{io.name}" value: "{io.name}" }}' for io in model_io.RESPONSE_OUTPUTS]
    return "step [\n  {\n" + "\n".join(lines) + "\n  }\n]"


def ensemble_configs(deployment: Deployment) -> dict[str, str]:
    """The ensemble config(s) by model name: `<name>` alone, or `<name>` in front of a cached `<name>_pipeline`.

    Triton's response cache keys a request on its inputs only, not on the outputs it asks for, and stores the
    response as sent: with the cache on the client-facing ensemble, a request for `video` alone would leave a cached
    entry without `frames`, and a later request for `frames` would get a response without them. So with the cache
    on, the client-facing `<name>` forwards to an inner ensemble `<name>_pipeline` that carries the cache: an
    ensemble step always asks its model for every output it maps, so the cached entries are complete, and the outer
    ensemble returns what each client asked for.
    """
    name = deployment.model_name
    io = model_io.ensemble_io()
    if not deployment.result_cache_bytes:
        return {
            name: fill(
                "ensemble.pbtxt",
                {
                    "model_name": name,
                    "description": "The client-facing ensemble: the five steps.",
                    "io": io,
                    "steps": model_io.ensemble_steps(name, deployment.video.encode_while_decoding),
                    "response_cache": "",
                },
            )
        }
    cached = f"{name}_{CACHED_PIPELINE}"
    return {
        name: fill(
            "ensemble.pbtxt",
            {
                "model_name": name,
                "description": f"The client-facing ensemble: every request goes to the cached {cached}.",
                "io": io,
                "steps": _forward_step(cached),
                "response_cache": "",
            },
        ),
        cached: fill(
            "ensemble.pbtxt",
            {
                "model_name": cached,
                "description": f"The five steps behind {name}, with Triton's response cache (result_cache_bytes).",
                "io": io,
                "steps": model_io.ensemble_steps(name, deployment.video.encode_while_decoding),
                "response_cache": "response_cache { enable: true }\n",
            },
        ),
    }


def dynamic_batching(serving: Serving) -> str:
    """The scheduler's `dynamic_batching` block: Triton's own queue (arrival order, bounded) and batcher."""
    lines = [f"  max_queue_delay_microseconds: {round(serving.max_queue_delay_ms * 1000)}"]
    if serving.max_queue_size is not None:
        # A request beyond the queue is refused at once with UNAVAILABLE "Exceeds maximum queue size".
        lines.append(f"  default_queue_policy {{ max_queue_size: {serving.max_queue_size} }}")
    return "dynamic_batching {\n" + "\n".join(lines) + "\n}\n"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tp_shards(deployment: Deployment, component: ComponentConfig, artifacts: Path, version_dir: Path) -> None:
    """The build-time tp shards next to the scheduler model; the manifest records the plan they were cut for."""
    from wan_triton.parallel.tp_shards import MANIFEST, shard_folder_name

    name = shard_folder_name(component.parallel, component.precision)
    src = artifacts / name
    if not (src / MANIFEST).is_file():
        logger.warning("%s: no tp shards built; each worker will load the whole experts and cut them", src)
        return
    shutil.copytree(src, version_dir / name, copy_function=_link_or_copy)


def _link_fp8_weights(artifacts: Path, version_dir: Path) -> None:
    """The build-time FP8 weights next to the scheduler model (wan_triton.runtime.fp8_weights), where built."""
    from wan_triton.runtime.fp8_weights import FOLDER, MANIFEST

    src = artifacts / FOLDER
    if (src / MANIFEST).is_file():
        shutil.copytree(src, version_dir / FOLDER, copy_function=_link_or_copy)


def _model_py(deployment: Deployment, role: str) -> str:
    return fill(
        "model.py",
        {"role": role, "class_name": CLASS_NAMES[role], "nice": str(deployment.serving.model_thread_nice)},
    )


def _render_stream(deployment: Deployment, staging: Path) -> None:
    """The decoupled streaming endpoint `<model_name>_stream`, beside the ensemble (see serving/stream.py)."""
    name = deployment.model_name
    model_dir = staging / f"{name}_{model_io.STREAM.role}"
    (model_dir / VERSION).mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        fill(
            "stream.pbtxt",
            {"model_name": model_dir.name, "ensemble_name": name, "io": model_io.config_io(model_io.STREAM)},
        ),
        encoding="utf-8",
    )
    (model_dir / VERSION / "model.py").write_text(_model_py(deployment, model_io.STREAM.role), encoding="utf-8")
    (model_dir / DEPLOYMENT_FILE).write_text(deployment.to_json(), encoding="utf-8")


def render_repository(deployment: Deployment, checkpoint: Path, artifacts: Path, repo: Path) -> Path:
    """Write the model repository for `deployment` to `repo` (replacing an earlier render there)."""
    repo = repo.resolve()
    if repo.exists() and any(repo.iterdir()) and not (repo / MARKER).exists():
        raise RenderError(f"{repo} exists and was not made by this renderer; refusing to overwrite it")
    deployment = deployment.model_copy(update={"checkpoint": str(checkpoint.resolve())})
    staging = repo.with_name(repo.name + ".rendering")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / MARKER).write_text("rendered by wan_build.render\n", encoding="utf-8")

    ckpt = Checkpoint(checkpoint.resolve())
    name = deployment.model_name
    for model_name, config in ensemble_configs(deployment).items():
        (staging / model_name / VERSION).mkdir(parents=True)
        (staging / model_name / "config.pbtxt").write_text(config, encoding="utf-8")

    for step in model_io.STEPS:
        model_dir = staging / f"{name}_{step.role}"
        version_dir = model_dir / VERSION
        version_dir.mkdir(parents=True)
        component = _component(deployment, step.role)
        # A parallel plan's instance only supervises its worker group (which takes GPUs 0 .. world size - 1).
        on_gpu = component is not None and component.device == "cuda" and component.parallel.is_single
        (model_dir / "config.pbtxt").write_text(
            fill(
                "step.pbtxt",
                {
                    "model_name": f"{name}_{step.role}",
                    "ensemble_name": name,
                    "role": step.role,
                    "io": model_io.config_io(step),
                    "max_batch_size": str(deployment.serving.max_batch_size if step.batched else 0),
                    "batching": dynamic_batching(deployment.serving) if step.batched else "",
                    "instance_count": str(component.instance_count if component else 1),
                    "instance_kind": "KIND_GPU" if on_gpu else "KIND_CPU",
                    # A step on a GPU takes its inputs where the previous step left them (DLPack, no host copy).
                    "parameters": GPU_INPUTS_PARAMETER if on_gpu else "",
                },
            ),
            encoding="utf-8",
        )
        (version_dir / "model.py").write_text(_model_py(deployment, step.role), encoding="utf-8")
        (model_dir / DEPLOYMENT_FILE).write_text(deployment.to_json(), encoding="utf-8")
        for pattern in step_graphs(deployment, step.role, ckpt):
            matches = sorted(artifacts.glob(pattern))
            if not matches:
                raise RenderError(f"{artifacts}: no exported graph matching {pattern!r} for {step.role}")
            for src in matches:
                _link_or_copy(src, version_dir / src.name)
        if component is not None and component.parallel.tp > 1:
            _link_tp_shards(deployment, component, artifacts, version_dir)
        if component is not None and component.precision == "fp8":
            _link_fp8_weights(artifacts, version_dir)

    _render_stream(deployment, staging)

    if repo.exists():
        shutil.rmtree(repo)
    staging.rename(repo)
    logger.info("rendered model repository %s (%d models)", repo, sum(1 for p in repo.iterdir() if p.is_dir()))
    return repo
