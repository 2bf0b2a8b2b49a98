"""One spec per exported component: tensor names, dtypes, dynamic axes and min/opt/max shapes.

ONNX export (input/output names, dynamic axes), the ONNX Runtime check, the engines' input binding and the
optimization profiles a TensorRT build needs all read these specs, so they cannot disagree. Shapes are given
with symbolic dims; `DimRange` says the range each symbolic dim may take for a deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from wan_triton.model.checkpoint import MAX_SEQUENCE_LENGTH, Checkpoint
from wan_triton.model.vae_chunks import encoder_layouts_from_config, layouts_from_config

# Triton datatype names for the numpy dtypes this project uses.
TRITON_DTYPES: dict[str, str] = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
    "object": "TYPE_STRING",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name; "object" for BYTES
    shape: tuple[int | str, ...]  # ints are fixed, strings name a DimRange

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}[
            self.dtype
        ]

    @property
    def triton_dtype(self) -> str:
        return TRITON_DTYPES[self.dtype]


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class ComponentSpec:
    """The graph of one exported component."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For `torch.onnx.export(dynamic_axes=...)` (TorchScript exporter) and for checking exported graphs."""
        axes: dict[str, dict[int, str]] = {}
        for tensor in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
            if named:
                axes[tensor.name] = named
        return axes

    def resolve(self, tensor: TensorSpec, which: str) -> tuple[int, ...]:
        """The concrete shape of `tensor` at the `which` ("min", "opt" or "max") point of every range."""
        return tuple(d if isinstance(d, int) else getattr(self.dims[d], which) for d in tensor.shape)

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shapes per input: what a TensorRT optimization profile needs."""
        return {t.name: (self.resolve(t, "min"), self.resolve(t, "opt"), self.resolve(t, "max")) for t in self.inputs}

    def sample_inputs(self, which: str = "opt", seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the `which` shapes, for export and ONNX-vs-PyTorch checks."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = self.resolve(t, which)
            if t.dtype == "int64":
                out[t.name] = rng.integers(0, 100, size=shape, dtype=np.int64)
            else:
                out[t.name] = rng.standard_normal(shape).astype(t.dtype)
        return out


@dataclass(frozen=True)
class ShapeLimits:
    """The largest request a deployment accepts, which bounds every dynamic dim."""

    max_height: int
    max_width: int
    max_num_frames: int
    opt_height: int
    opt_width: int
    opt_num_frames: int


def text_encoder_spec(ckpt: Checkpoint) -> ComponentSpec:
    # Batch is 1 (no guidance) or 2 (prompt + negative prompt).
    return ComponentSpec(
        name="text_encoder",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", MAX_SEQUENCE_LENGTH)),
            TensorSpec("attention_mask", "int64", ("batch", MAX_SEQUENCE_LENGTH)),
        ),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", MAX_SEQUENCE_LENGTH, ckpt.text_dim)),),
        dims={"batch": DimRange(1, 2, 2)},
    )


def denoiser_spec(ckpt: Checkpoint, limits: ShapeLimits, expert: str = "transformer") -> ComponentSpec:
    """One expert. Guidance runs as a batch of 2 (cond, uncond) so both branches share one forward.

    `hidden_states` has the transformer's input channels (I2V: latents, frame mask and condition), `noise_pred` the
    latents'. The timestep is int64 [batch], or for `expand_timesteps` checkpoints float32 [batch, latent_frames],
    one per latent frame (see `denoise.call_transformer`)."""
    sp = ckpt.vae_scale_factor_spatial
    in_channels = int(ckpt.config(expert)["in_channels"])
    out_channels = ckpt.latent_channels
    grid = ("latent_frames", "latent_height", "latent_width")
    timestep = (
        TensorSpec("timestep", "float32", ("batch", "latent_frames"))
        if ckpt.expand_timesteps
        else TensorSpec("timestep", "int64", ("batch",))
    )
    return ComponentSpec(
        name=expert,
        inputs=(
            TensorSpec("hidden_states", "float32", ("batch", in_channels, *grid)),
            timestep,
            TensorSpec("encoder_hidden_states", "float32", ("batch", MAX_SEQUENCE_LENGTH, ckpt.text_dim)),
        ),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", out_channels, *grid)),),
        dims={
            "batch": DimRange(1, 2, 2),
            "latent_frames": DimRange(
                1, ckpt.num_latent_frames(limits.opt_num_frames), ckpt.num_latent_frames(limits.max_num_frames)
            ),
            "latent_height": DimRange(ckpt.patch_size[1], limits.opt_height // sp, limits.max_height // sp),
            "latent_width": DimRange(ckpt.patch_size[2], limits.opt_width // sp, limits.max_width // sp),
        },
    )


def _scaled(dims: dict[str, DimRange], base: str, scale: int) -> str:
    """The dim name for `scale` x the `base` latent dim, registered with the scaled range."""
    if scale == 1:
        return base
    name = f"{base}_x{scale}"
    r = dims[base]
    dims[name] = DimRange(r.min * scale, r.opt * scale, r.max * scale)
    return name


def vae_decoder_phase_specs(ckpt: Checkpoint, limits: ShapeLimits) -> list[ComponentSpec]:
    """One spec per VAE decoder phase graph (see `vae_chunks`): `latent` (one latent frame) plus the cache tensors
    the phase takes, `video` (that frame's pixels) plus the cache it leaves. Batch is 1: videos decode one by one.

    Cache and video sizes are fixed multiples of the latent height/width; each multiple gets its own dim name
    (`latent_height_x2`, ...) whose range is the latent range scaled, so TensorRT profiles stay consistent.
    """
    latent = denoiser_spec(ckpt, limits).dims
    z_dim = int(ckpt.config("vae")["z_dim"])
    specs = []
    for layout in layouts_from_config(ckpt.config("vae")):
        dims = {"latent_height": latent["latent_height"], "latent_width": latent["latent_width"]}

        def shape(channels: int, frames: int, scale_h: int, scale_w: int, dims: dict = dims) -> tuple[int | str, ...]:
            return 1, channels, frames, _scaled(dims, "latent_height", scale_h), _scaled(dims, "latent_width", scale_w)

        cache_in = [(i, layout.inputs[i]) for i in layout.input_slots]
        cache_out = [(i, layout.outputs[i]) for i in layout.output_slots]
        specs.append(
            ComponentSpec(
                name=f"vae_decoder_phase{layout.index}",
                inputs=(
                    TensorSpec("latent", "float32", shape(z_dim, 1, 1, 1)),
                    *(
                        TensorSpec(f"cache_in_{i:02d}", "float32", shape(s.channels, s.frames, s.scale_h, s.scale_w))
                        for i, s in cache_in
                    ),
                ),
                outputs=(
                    TensorSpec(
                        "video", "float32", shape(layout.video_channels, layout.video_frames, *layout.video_scale)
                    ),
                    *(
                        TensorSpec(f"cache_out_{i:02d}", "float32", shape(s.channels, s.frames, s.scale_h, s.scale_w))
                        for i, s in cache_out
                    ),
                ),
                dims=dims,
            )
        )
    return specs


def vae_encoder_phase_specs(ckpt: Checkpoint, limits: ShapeLimits) -> list[ComponentSpec]:
    """One spec per VAE encoder phase graph (`vae_chunks.VaeEncoderPhase`): `video` (1 frame in phase 0, 4 after)
    plus the cache it takes, `latent` (one latent frame, the posterior mean) plus the cache it leaves. Pixel sizes
    are the latent dims scaled by the VAE's stride (`latent_height_x8`, or `_x16` for the Wan2.2 VAE)."""
    latent = denoiser_spec(ckpt, limits).dims
    specs = []
    for layout in encoder_layouts_from_config(ckpt.config("vae")):
        dims = {"latent_height": latent["latent_height"], "latent_width": latent["latent_width"]}

        def shape(channels: int, frames: int, scale_h: int, scale_w: int, dims: dict = dims) -> tuple[int | str, ...]:
            return 1, channels, frames, _scaled(dims, "latent_height", scale_h), _scaled(dims, "latent_width", scale_w)

        cache_in = [(i, layout.inputs[i]) for i in layout.input_slots]
        cache_out = [(i, layout.outputs[i]) for i in layout.output_slots]
        scale = layout.pixel_scale
        specs.append(
            ComponentSpec(
                name=f"vae_encoder_phase{layout.index}",
                inputs=(
                    TensorSpec("video", "float32", shape(layout.video_channels, layout.frames, scale, scale)),
                    *(
                        TensorSpec(f"cache_in_{i:02d}", "float32", shape(s.channels, s.frames, s.scale_h, s.scale_w))
                        for i, s in cache_in
                    ),
                ),
                outputs=(
                    TensorSpec("latent", "float32", shape(layout.latent_channels, 1, 1, 1)),
                    *(
                        TensorSpec(f"cache_out_{i:02d}", "float32", shape(s.channels, s.frames, s.scale_h, s.scale_w))
                        for i, s in cache_out
                    ),
                ),
                dims=dims,
            )
        )
    return specs
