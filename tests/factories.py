"""What tests build their inputs from: requests for the tiny checkpoints, prompt embeddings, the shipped
deployments and the shape limits of the export tests.

`make_request(**overrides)` is the default request of the in-process tests: 32x48 pixels and 5 frames (2 latent
frames of 4 x 6 latents, 12 tokens after the 1x2x2 patch), 6 steps, which cross the expert boundary of the tiny
test checkpoints (flow shift 5), with guidance on. A test overrides what its point depends on and keeps the rest.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from wan_triton.config.deployment import REPOSITORY_MARKER, Deployment
from wan_triton.config.request import GenerationRequest, validate_request
from wan_triton.model.specs import ShapeLimits

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS_DIR = REPO_ROOT / "model_repository" / "deployments"

_DEFAULT_REQUEST = GenerationRequest(
    prompt="p",
    negative_prompt="n",
    height=32,
    width=48,
    num_frames=5,
    num_inference_steps=6,
    seed=3,
    guidance_scale=5.0,
    guidance_scale_2=2.0,
    fps=16,
)


# Tiny image-to-video checkpoints (wan_build.tiny_model.TinyConfig) whose sizes differ from the tiny-i2v / tiny-ti2v
# defaults in every dimension the loader must read: layers, heads, widths, text, vocabulary, flow shift, latent
# channels, boundary, and for TI2V the Wan2.2 VAE's widths.
_OTHER_SIZES = dict(
    num_layers=3,
    num_attention_heads=3,
    attention_head_dim=8,
    ffn_dim=40,
    text_dim=24,
    text_layers=3,
    text_heads=3,
    text_ff=48,
    vocab_pieces=300,
    vae_base_dim=6,
    flow_shift=5.0,
)
OTHER_I2V = {**_OTHER_SIZES, "kind": "i2v", "vae_z_dim": 12, "boundary_ratio": 0.9, "seed": 12}
OTHER_TI2V = {
    **_OTHER_SIZES,
    "kind": "ti2v",
    "ti2v_z_dim": 24,
    "ti2v_vae_base_dim": 6,
    "ti2v_decoder_base_dim": 10,
    "seed": 13,
}


def make_request(**overrides) -> GenerationRequest:
    """The default tiny request (module docstring) with `overrides` applied."""
    return replace(_DEFAULT_REQUEST, **overrides)


# The GPU tests' request: 64x96 pixels, 9 frames, crossing the expert switch in 8 steps; 3 latent frames x 4 x 6 =
# 72 tokens, which split over 2 Ulysses ranks.
GPU_REQUEST = make_request(
    height=64, width=96, num_frames=9, num_inference_steps=8, guidance_scale=4.0, guidance_scale_2=3.0
)

# The largest request the CPU deployments allow (384x384 = max_pixels, 33 frames, 50 steps): its denoising loop runs
# for many seconds, so a cancel, a deadline or other requests sent meanwhile land while it runs.
LONGEST_CPU = dict(height=384, width=384, num_frames=33, num_inference_steps=50)

# Export and phase-spec limits of the tiny checkpoints: the optimum is a shape between the export examples and the
# maximum.
SHAPE_LIMITS = ShapeLimits(
    max_height=64, max_width=96, max_num_frames=17, opt_height=32, opt_width=48, opt_num_frames=9
)


def make_embeds(text_dim: int, rows: int = 2, seed: int = 0) -> torch.Tensor:
    """Random prompt embeddings [rows, 512, text_dim]: two rows for a guided request (prompt and negative)."""
    return torch.randn(rows, 512, text_dim, generator=torch.Generator().manual_seed(seed))


def expert_forward(expert, seed: int = 0) -> torch.Tensor:
    """A tiny expert's noise prediction for random latents [2, 16, 3, 8, 12] (guided batch of 2) and prompt
    embeddings, at timesteps 900 and 400."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 8, 12, generator=gen)
    text = torch.randn(2, 512, expert.config.text_dim, generator=gen)
    with torch.no_grad():
        return expert(x, torch.tensor([900, 400]), text, return_dict=False)[0]


def load_deployment(name: str) -> Deployment:
    """A shipped deployment by file name: "cpu", "cpu_torch", "cpu_parallel", "gpu_a14b"."""
    return Deployment.load(DEPLOYMENTS_DIR / f"{name}.yaml")


def validated_request(
    deployment: Deployment,
    now_unix_s: float | None = None,
    spatial_multiple: int = 16,
    temporal_stride: int = 4,
    image_input: str = "none",
    two_experts: bool = True,
    **inputs,
) -> GenerationRequest:
    """`validate_request` on plain values, each as the one-element tensor Triton hands over (text as BYTES). The
    size multiples default to those of the tiny checkpoints (and Wan2.2 A14B): 16 pixels, 4 frames."""
    arrays = {
        name: np.array([value], dtype=object if isinstance(value, str | bytes) else None)
        for name, value in inputs.items()
    }
    return validate_request(
        arrays,
        deployment,
        spatial_multiple,
        temporal_stride,
        now_unix_s=now_unix_s,
        image_input=image_input,
        two_experts=two_experts,
    )


def build_repository(checkpoint: Path, deployment: Deployment, root: Path, artifacts_root: Path) -> Path:
    """`make build` of `deployment` over `checkpoint`: its file `root/<model_name>.json`, its repository
    `root/repo_<model_name>` (returned), graphs exported under `artifacts_root`."""
    from wan_build.__main__ import main as build_main

    name = deployment.model_name
    dep_file = root / f"{name}.json"
    dep_file.write_text(deployment.to_json())
    repo = root / f"repo_{name}"
    args = ["--model", str(checkpoint), "--deployment", str(dep_file), "--repo", str(repo)]
    assert build_main([*args, "--artifacts-root", str(artifacts_root)]) == 0
    return repo


# One Python-backend model taking a float X [1] and answering Y [1]: the platform tests' stand-in for a served model
# whose stub they freeze or whose teardown they make hang.
_ONE_MODEL_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


def one_model_repository(root: Path, name: str, model_py: str) -> Path:
    """A model repository under `root`/repo holding the one model `name` (X [1] -> Y [1]) with `model_py`; returns
    the model's folder (the repository is its parent)."""
    repo = root / "repo"
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True)
    (repo / REPOSITORY_MARKER).touch()
    (model_dir / "config.pbtxt").write_text(_ONE_MODEL_CONFIG.format(name=name))
    (model_dir / "1" / "model.py").write_text(model_py)
    return model_dir


def use_fp8_on_cpu(set_attribute=setattr) -> None:
    """The served FP8 path on CPU: the Hopper check passes, the FlashAttention-3 op is not built (off CUDA
    `fp8_attention` runs its fp32 reference math), and cross-attention takes PyTorch's SDPA. What this leaves is the
    wiring: loading, build-time weights, expert swapping, parallel plans and the denoising loop at precision fp8.
    `set_attribute`: a MonkeyPatch's setattr to undo it after a test; plain setattr in a process of its own."""
    from wan_triton.kernels import attention, fp8

    set_attribute(fp8, "supported", lambda device: None)
    set_attribute(fp8, "_fa3_fp8", lambda: None)
    set_attribute(attention, "attention_fn", lambda backend: attention._sdpa)


def fp8_cpu_denoiser(ckpt, residency: str = "resident", fp8_folder: Path | None = None, cfg=None):
    """Both experts at precision fp8 built on the CPU as `components.build_denoiser` serves them on one GPU (after
    `use_fp8_on_cpu`): resident, or swapped through one device module. `cfg`: validated as deployed (cuda)."""
    from wan_triton.config.deployment import ComponentConfig, EngineKind
    from wan_triton.model.checkpoint import EXPERTS
    from wan_triton.model.denoise import Denoiser
    from wan_triton.runtime.experts import swapped_experts, torch_engines, torch_expert

    cfg = cfg or ComponentConfig(engine=EngineKind.TORCH, device="cuda", precision="fp8", attention="cudnn")
    device, swapper = torch.device("cpu"), None
    if residency == "swap":
        experts, swapper = swapped_experts(ckpt, cfg, device, torch.bfloat16, fp8_folder)
    else:
        experts = {}
        for name in EXPERTS:
            module, _ = torch_expert(ckpt, name, cfg, device, torch.bfloat16, fp8_folder)
            experts[name], _ = torch_engines(module, device, torch.bfloat16, cuda_graphs=False)
    return Denoiser(ckpt=ckpt, experts=experts, device=device, dtype=torch.bfloat16, swapper=swapper)
