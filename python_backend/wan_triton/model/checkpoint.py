"""Read a Wan2.2 checkpoint in the Diffusers layout: T2V-A14B, I2V-A14B or TI2V-5B.

The kind comes from the checkpoint itself (model_index.json's `_class_name`, `boundary_ratio`, `expand_timesteps`,
the component configs), never from a flag. Nothing here assumes the tiny test config: layer counts, widths,
channels, vocabulary, text length, VAE strides and scheduler settings all come from the checkpoint's own config
files. Weights are read from safetensors only (pickle-based `.bin` files are refused, since loading them can run
arbitrary code).

Reading the layout and configs needs no torch, so the steps that load no module (preprocess, the stream model) open
a checkpoint without importing it; the loaders import torch, transformers and diffusers themselves.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from wan_triton.config.deployment import LoraConfig, SolverConfig
from wan_triton.model import random_init

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
EXPERTS = ("transformer", "transformer_2")
# model_index.json `_class_name`s served: text-to-video (T2V-A14B, and TI2V-5B with expand_timesteps) and
# image-to-video (I2V-A14B).
PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline")
# What a checkpoint does with a request's image (`Checkpoint.image_input`).
ImageInput = Literal["none", "required", "optional"]
# Tokenizer class names `Checkpoint.load_tokenizer` takes from `tokenizer_config.json` as they are.
TOKENIZER_SUFFIXES = ("Tokenizer", "TokenizerFast")
# WanPipeline.__call__ default; the official Wan2.2 config uses the same text length.
MAX_SEQUENCE_LENGTH = 512


class CheckpointError(ValueError):
    """The directory is not a usable Wan2.2 checkpoint."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing {path}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory with `model_index.json`, `text_encoder/`, `tokenizer/`, `transformer/`, `vae/`,
    `scheduler/` and, for the two-expert A14B kinds (those with a `boundary_ratio`), `transformer_2/`; with the
    deployment's LoRAs (fused into the experts as they load) and solver override, if any."""

    root: Path
    loras: tuple[LoraConfig, ...] = ()
    solver: SolverConfig | None = None

    @classmethod
    def open(
        cls, root: str | Path, loras: tuple[LoraConfig, ...] = (), solver: SolverConfig | None = None
    ) -> Checkpoint:
        ckpt = cls(Path(root).resolve(), tuple(loras), solver)
        ckpt.validate()
        return ckpt

    def validate(self) -> None:
        index = self.model_index
        class_name = index.get("_class_name")
        if class_name not in PIPELINE_CLASSES:
            raise CheckpointError(
                f"{self.root}: pipeline {class_name!r} is not served; expected one of {PIPELINE_CLASSES}"
            )
        if index.get("image_encoder") and index["image_encoder"][0] is not None:
            raise CheckpointError(
                f"{self.root}: has a CLIP `image_encoder` (a Wan2.1-style I2V checkpoint); only Wan2.2 checkpoints "
                "(T2V-A14B, I2V-A14B, TI2V-5B), which condition on VAE latents alone, are served"
            )
        expected = [*COMPONENTS, *(["transformer_2"] if self.boundary_ratio is not None else [])]
        missing = [c for c in expected if c not in index or not (self.root / c).is_dir()]
        if missing:
            raise CheckpointError(f"{self.root}: components missing from the Diffusers layout: {missing}")
        if self.expand_timesteps and class_name == "WanImageToVideoPipeline":
            raise CheckpointError(f"{self.root}: a TI2V checkpoint names WanPipeline (its image path is built in)")
        vae_channels = self.latent_channels
        for expert in filter(self.has_expert, EXPERTS):
            in_channels = int(self.config(expert)["in_channels"])
            if in_channels != vae_channels + self.condition_channels:
                raise CheckpointError(
                    f"{self.root}: {expert} takes {in_channels} input channels; a {class_name} with a z_dim "
                    f"{vae_channels} VAE needs {vae_channels + self.condition_channels}"
                )
        if self.random_weights:
            logger.warning("%s is a RANDOM-WEIGHT benchmark checkpoint: its output is noise", self.root)
            return
        for component in ("text_encoder", *filter(self.has_expert, EXPERTS), "vae"):
            folder = self.root / component
            if not any(folder.glob("*.safetensors")):
                raise CheckpointError(f"{folder}: no .safetensors weights (other weight formats are refused)")

    @property
    def random_weights(self) -> bool:
        """Configs only: modules are built with random weights (benchmarks of the real shapes)."""
        return (self.root / random_init.MARKER).is_file()

    @cached_property
    def model_index(self) -> dict[str, Any]:
        return _read_json(self.root / "model_index.json")

    def config(self, component: str) -> dict[str, Any]:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return _read_json(self.root / component / name)

    @property
    def boundary_ratio(self) -> float | None:
        return self.model_index.get("boundary_ratio")

    @property
    def image_to_video(self) -> bool:
        """I2V-A14B: the VAE-encoded image (and a 4-channel frame mask) enters as extra transformer channels."""
        return self.model_index.get("_class_name") == "WanImageToVideoPipeline"

    @property
    def expand_timesteps(self) -> bool:
        """TI2V-5B: per-token timesteps; an image replaces the first latent frame, whose timestep is then 0."""
        return bool(self.model_index.get("expand_timesteps", False))

    @property
    def image_input(self) -> ImageInput:
        """What a request's image is to this checkpoint: "none" (T2V-A14B), "required" (I2V-A14B) or "optional"
        (TI2V-5B: text-to-video without, image-to-video with)."""
        if self.image_to_video:
            return "required"
        return "optional" if self.expand_timesteps else "none"

    @property
    def condition_channels(self) -> int:
        """Transformer input channels beyond the latents: I2V's frame mask (one per frame the VAE folds into a
        latent frame) and the VAE-encoded condition video."""
        return self.vae_scale_factor_temporal + self.latent_channels if self.image_to_video else 0

    @property
    def kind(self) -> str:
        """T2V-A14B, I2V-A14B or TI2V-5B, for logs (what the code does follows the properties above)."""
        return {"none": "T2V", "required": "I2V", "optional": "TI2V"}[self.image_input]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config("scheduler").get("num_train_timesteps", 1000))

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(self.config("vae").get("scale_factor_temporal", 4))

    @property
    def vae_scale_factor_spatial(self) -> int:
        return int(self.config("vae").get("scale_factor_spatial", 8))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.config("transformer")["patch_size"])  # type: ignore[return-value]

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the solver updates: the VAE's z_dim (the transformer may take more, I2V)."""
        return int(self.config("vae")["z_dim"])

    @property
    def text_dim(self) -> int:
        return int(self.config("text_encoder")["d_model"])

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this many pixels (VAE stride x patch size)."""
        return self.vae_scale_factor_spatial * max(self.patch_size[1], self.patch_size[2])

    def num_latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_factor_temporal + 1

    # Loaders. Each takes the dtype (float32 when None) and device to load straight into.

    def load_tokenizer(self):
        """The tokenizer class `tokenizer_config.json` names, as `AutoTokenizer` picks it for a tokenizer folder
        without a model config; `AutoTokenizer` itself when the class is not one transformers exports.
        `AutoTokenizer` imports torch (through the model configs), which the preprocess step otherwise does without."""
        import transformers

        folder = self.root / "tokenizer"
        config_file = folder / "tokenizer_config.json"
        name = _read_json(config_file).get("tokenizer_class") if config_file.is_file() else None
        named = None
        if isinstance(name, str) and name.endswith(TOKENIZER_SUFFIXES):
            named = getattr(transformers, name, None)
        if isinstance(named, type) and issubclass(named, transformers.PreTrainedTokenizerBase):
            return named.from_pretrained(folder)
        return transformers.AutoTokenizer.from_pretrained(folder)

    def load_text_encoder(self, dtype: torch.dtype | None = None, device: str = "cpu", eager_attention: bool = False):
        import torch
        from transformers import UMT5EncoderModel

        dtype = torch.float32 if dtype is None else dtype

        if self.random_weights:
            from transformers import UMT5Config

            config = UMT5Config.from_pretrained(self.root / "text_encoder")
            return random_init.build(lambda: UMT5EncoderModel(config), dtype, device)
        kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
        if eager_attention:
            # The dynamo ONNX exporter fails on UMT5 under SDPA attention.
            kwargs["attn_implementation"] = "eager"
        model = UMT5EncoderModel.from_pretrained(self.root / "text_encoder", **kwargs)
        return model.to(device).eval()

    def has_expert(self, name: str) -> bool:
        return (self.root / name / "config.json").is_file()

    def expert_weight_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's weights in `dtype`, from its config alone (built on the meta device)."""
        import torch
        from diffusers import WanTransformer3DModel

        with torch.device("meta"):
            module = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(self.root / EXPERTS[0]))
        return sum(p.numel() for p in module.parameters()) * dtype.itemsize

    def load_transformer(self, name: str, dtype: torch.dtype | None = None, device: str = "cpu"):
        """The expert, with the LoRAs that apply to it fused into its weights (on `device`: a random-weight
        benchmark expert takes its LoRAs there too)."""
        import torch

        from wan_triton.model import lora

        dtype = torch.float32 if dtype is None else dtype
        return lora.fuse(self._load_transformer(name, dtype, device), self.loras, name)

    def _load_transformer(self, name: str, dtype: torch.dtype, device: str):
        from diffusers import WanTransformer3DModel

        if name not in EXPERTS:
            raise ValueError(f"unknown expert {name!r}; expected one of {EXPERTS}")
        if self.random_weights:
            config = WanTransformer3DModel.load_config(self.root / name)
            return random_init.build(
                lambda: WanTransformer3DModel.from_config(config),
                dtype,
                device,
                list(WanTransformer3DModel._keep_in_fp32_modules),
            )
        model = WanTransformer3DModel.from_pretrained(
            self.root / name, torch_dtype=dtype, use_safetensors=True, device_map=device if device != "cpu" else None
        )
        return model.to(device).eval()

    def load_vae(self, dtype: torch.dtype | None = None, device: str = "cpu"):
        import torch
        from diffusers import AutoencoderKLWan

        dtype = torch.float32 if dtype is None else dtype

        if self.random_weights:
            config = AutoencoderKLWan.load_config(self.root / "vae")
            return random_init.build(lambda: AutoencoderKLWan.from_config(config), dtype, device)
        model = AutoencoderKLWan.from_pretrained(self.root / "vae", torch_dtype=dtype, use_safetensors=True)
        return model.to(device).eval()

    def make_solver(self):
        """A fresh solver for one request (solvers keep per-run state): the diffusers scheduler class the checkpoint
        names, or the deployment's override of it. The project says "solver" for it; "scheduler" is the Triton step
        that runs the denoising loop."""
        if self.solver is None:
            # The class named in model_index.json (UniPCMultistepScheduler in the official Wan2.2 checkpoints).
            library, class_name = self.model_index["scheduler"]
            if library != "diffusers":
                raise CheckpointError(f"unsupported scheduler {library}.{class_name}")
            return solver_class(class_name).from_config(self.config("scheduler"))
        cls = solver_class(self.solver.name)
        overrides = self.solver.overrides
        # from_config silently ignores a key the class does not take (Euler given flow_shift keeps shift 1.0).
        accepted = set(cls._get_init_keys(cls)) - {"self", "kwargs"}
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise CheckpointError(
                f"scheduler: {self.solver.name} takes no {unknown}; its settings are {sorted(accepted)}"
            )
        return cls.from_config(self.config("scheduler"), **overrides)


def solver_class(name: str):
    """The diffusers scheduler class `name`, which must be a flow-matching solver (Wan's experts predict flow)."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise CheckpointError(f"scheduler: {name!r} is not a diffusers scheduler class")
    keys = set(cls._get_init_keys(cls))
    if not keys & {"use_flow_sigmas", "shift", "flow_shift", "use_dynamic_shifting"}:
        raise CheckpointError(f"scheduler: {name} is not a flow-matching scheduler")
    return cls
