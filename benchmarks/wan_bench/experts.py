"""Wan2.2-T2V-A14B experts with random weights built on the device, the request sizes the benchmarks run, the matmul
FLOP of a forward, and guided denoising steps through the code the server runs.

No checkpoint is downloaded: an expert is diffusers' `WanTransformer3DModel` of the real config (A14B: 40 layers,
40 heads of 128, 14.29 B parameters) made directly on the device with random weights
(`wan_triton.model.random_init.build`), in the dtypes `from_pretrained(torch_dtype=...)` leaves; speed does not
depend on weight values. The configs themselves are the checkpoint writer's (`wan_build.shapes_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from wan_build.shapes_checkpoint import A14B_TRANSFORMER, SCHEDULER

# A 4-head expert for smoke tests on the CPU: every parallel plan up to 4 ranks fits it.
TINY_TRANSFORMER = dict(A14B_TRANSFORMER, num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=2)
TINY_TRANSFORMER["text_dim"] = 32
TEXT_LEN = 512  # the text encoder's padded sequence

# (height, width, frames) of a request.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 64, 9),
    "144p": (144, 256, 9),
    "240p": (240, 416, 17),
    "480p": (480, 832, 81),
    "720p": (720, 1280, 81),
}


def expert_of(tiny: bool) -> tuple[dict, torch.dtype]:
    """(config, dtype) of the expert a benchmark builds: A14B in bf16, or the tiny one in fp32."""
    return (TINY_TRANSFORMER, torch.float32) if tiny else (A14B_TRANSFORMER, torch.bfloat16)


def latent_frames(num_frames: int) -> int:
    """The VAE's temporal compression: 4 frames a latent frame, plus the first."""
    return (num_frames - 1) // 4 + 1


def latent_shape(size: tuple[int, int, int]) -> tuple[int, int, int, int, int]:
    """[1, 16 channels, latent frames, height / 8, width / 8] of one video."""
    height, width, frames = size
    return (1, 16, latent_frames(frames), height // 8, width // 8)


def tokens_of(size: tuple[int, int, int]) -> int:
    """The expert's sequence length at a size (2x2 patches of the latent frames)."""
    height, width, frames = size
    return latent_frames(frames) * (height // 16) * (width // 16)


def layer_linear_flop(tokens: int, config: dict = A14B_TRANSFORMER, text_len: int = TEXT_LEN) -> float:
    """Matmul FLOP of one block's linear layers for one sample: self-attention Q, K, V, O, cross-attention Q, O and
    K, V on the text tokens, the FFN in and out."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    return (
        8 * tokens * d * d  # self-attn Q, K, V, O
        + 4 * tokens * d * d  # cross-attn Q, O
        + 4 * text_len * d * d  # cross-attn K, V on the text tokens
        + 4 * tokens * d * config["ffn_dim"]  # FFN in and out
    )


def forward_flop(tokens: int, config: dict = A14B_TRANSFORMER, text_len: int = TEXT_LEN) -> float:
    """Matmul FLOP of one forward (batch 1): every block's linear layers and both attentions."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    attention = 4 * tokens * tokens * d + 4 * tokens * text_len * d  # self-attention QK^T and PV, cross-attention
    return config["num_layers"] * (layer_linear_flop(tokens, config, text_len) + attention)


def build_expert(
    config: dict = A14B_TRANSFORMER, dtype: torch.dtype = torch.bfloat16, device="cuda"
) -> torch.nn.Module:
    """One expert with random weights made on `device`, the same on every process (seeded)."""
    from diffusers import WanTransformer3DModel

    from wan_triton.model import random_init

    torch.manual_seed(0)
    return random_init.build(
        lambda: WanTransformer3DModel(**config),
        dtype,
        str(device),
        list(WanTransformer3DModel._keep_in_fp32_modules),
    )


def build_rank_expert(
    plan,
    groups,
    config: dict,
    dtype,
    device,
    attention_backend,
    ulysses_head_groups: int = 1,
    precision: str = "bfloat16",
):
    """One expert with random weights, as rank `groups.rank` of `plan` serves it: the single-GPU path
    (`attention.install`, or `fp8.install` at precision fp8: exactly components.build_denoiser's) or cut for the
    plan (`parallelize`, then `install_fp8` at precision fp8: the rank worker's)."""
    from wan_triton.kernels import attention, fp8
    from wan_triton.parallel.sharding import install_fp8, parallelize

    if precision == "fp8" and dtype != torch.bfloat16:
        raise ValueError("precision fp8 quantizes a bf16 expert (A14B), not the tiny fp32 one")
    module = build_expert(config, dtype, device)
    if plan.is_single:
        (fp8.install if precision == "fp8" else attention.install)(module, attention_backend, device)
    else:
        chosen = parallelize(module, groups, attention_backend, device, ulysses_head_groups)
        if precision == "fp8":
            install_fp8(module, groups, chosen, device)
    return module


def served_engine(module, plan, device, dtype, compile_blocks: bool, cuda_graphs: bool):
    """The engine a rank serves `module` with, through the code the server runs: regional compile and CUDA graphs
    as `components.build_denoiser` sets them up on one GPU and the rank worker on a parallel rank."""
    from wan_triton.runtime.experts import compile_expert_blocks, torch_engines

    if compile_blocks:
        compile_expert_blocks(module, parallel=not plan.is_single)
    eager, graphed = torch_engines(module, device, dtype, cuda_graphs, parallel=not plan.is_single)
    return graphed or eager


def step_inputs(
    config: dict, size: tuple[int, int, int], device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random (latents [1, 16, T, h, w] in fp32, text embeddings [2, 512, text_dim] in `dtype`: the prompt's
    and the negative prompt's) of one request at `size`."""
    gen = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(latent_shape(size), generator=gen).to(device)
    text = torch.randn(2, TEXT_LEN, config["text_dim"], generator=gen).to(device, dtype)
    return latents, text


def guided_step(engine, cfg_parallel, latents: torch.Tensor, text: torch.Tensor) -> Callable[[], None]:
    """A function running one guided step (`denoise_step`: forward(s), CFG exchange, guidance combine, UniPC
    update, guidance scale 4) from `latents`, advancing through the solver's 1000 timesteps."""
    from diffusers import UniPCMultistepScheduler

    from wan_triton.model.denoise import denoise_step

    solver = UniPCMultistepScheduler(**SCHEDULER)
    solver.set_timesteps(1000, device=latents.device)
    state = {"latents": latents, "i": 0}

    def step() -> None:
        t = solver.timesteps[state["i"] % 1000]
        state["latents"] = denoise_step(engine, solver, state["latents"], t, text, 4.0, cfg_parallel)
        state["i"] += 1

    return step
