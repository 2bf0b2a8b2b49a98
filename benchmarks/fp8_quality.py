"""How far `precision: fp8` moves a whole denoising run: the served denoising loop (both A14B experts, guidance, the
expert switch) from one seed in bf16 and in FP8, optionally an fp32 reference, on one Hopper GPU.

Each variant builds both experts from the same random weights (a configs-only A14B checkpoint, seeded, made in bf16 on
the device; the fp32 variant upcasts those same bf16 weights), installs what the deployment would (bf16: the `auto`
attention kernel, fused projections, compiled blocks; fp8: `wan_triton.kernels.fp8.install`, compiled blocks; fp32:
diffusers' attention, memory-efficient SDPA, TF32 off), and runs the same request with the same prompt embeddings.
Reported: the final latents' relative L2 against each other (and against fp32 where run), each variant's step time,
and the frames' PSNR of FP8 against bf16 after the VAE decode (the VAE in fp32, the same random weights for both;
frames mapped to 0..255 as the served video is).

RANDOM weights: the figures say how far the FP8 rounding moves a trajectory of these shapes, not how a video of the
trained model looks; trained weights and real prompts would need their own run.

    python benchmarks/fp8_quality.py --checkpoint /tmp/a14b --size 480p --steps 40 --out $OUT/fp8_quality.json

(`python -m wan_build.shapes_checkpoint /tmp/a14b` writes the configs-only checkpoint.) The fp32 run holds one expert
at a time on the device (57 GB; both would take 114 GB) and takes minutes per step at 480p: `--fp32` is for the smaller
sizes (240p).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from wan_bench.experts import SIZES, TEXT_LEN
from wan_bench.records import run_record, write_json
from wan_triton.config.deployment import EngineKind
from wan_triton.config.request import GenerationRequest
from wan_triton.kernels import attention, fp8
from wan_triton.model.checkpoint import EXPERTS, Checkpoint
from wan_triton.model.denoise import Denoiser
from wan_triton.model.engine import Engine
from wan_triton.model.vae import VaeDecoder, torch_vae_decode_fn
from wan_triton.runtime.experts import compile_expert_blocks, torch_engines

logger = logging.getLogger("benchmarks.fp8_quality")

WEIGHT_SEED = 0


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def served_dtype(variant: str) -> torch.dtype:
    """The experts' dtype of a variant: fp32 for the reference, else bf16 (FP8's activations too)."""
    return torch.float32 if variant == "fp32" else torch.bfloat16


def build_expert(ckpt: Checkpoint, name: str, variant: str, device: torch.device) -> Engine:
    """One expert from its seeded bf16 random weights (the same in every variant), served as `variant` (bf16, fp8 or
    fp32)."""
    torch.manual_seed(WEIGHT_SEED + EXPERTS.index(name))
    module = ckpt.load_transformer(name, torch.bfloat16, str(device))
    if variant == "fp32":
        module = module.float()  # parameter by parameter: at most about the fp32 expert on the device
    elif variant == "fp8":
        fp8.install(module, "auto", device)
        compile_expert_blocks(module, parallel=False)
    else:
        attention.install(module, "auto", device)
        compile_expert_blocks(module, parallel=False)
    engine, _ = torch_engines(module, device, served_dtype(variant), cuda_graphs=False)
    return engine


class OneExpertAtATime:
    """The experts of a variant whose two do not fit the GPU together (fp32 A14B: 57 GB each, 114 GB both): each is
    built at its first step, after the other is freed. The loop runs all the high-noise expert's steps, then the
    low-noise expert's, so each is built once; the first step of each counts its build (an outlier the median step
    time leaves out)."""

    def __init__(self, ckpt: Checkpoint, variant: str, device: torch.device) -> None:
        self.ckpt, self.variant, self.device = ckpt, variant, device
        self.name: str | None = None
        self.engine: Engine | None = None

    def run_expert(self, name: str, inputs: dict) -> dict:
        if name != self.name:
            self.engine = None
            gc.collect()
            torch.cuda.empty_cache()
            self.name, self.engine = name, build_expert(self.ckpt, name, self.variant, self.device)
            logger.info("%s: built %s", self.variant, name)
        return self.engine.run(inputs)


class _ExpertProxy(Engine):
    """An engine that runs one named expert of a `OneExpertAtATime`."""

    kind = EngineKind.TORCH

    def __init__(self, experts: OneExpertAtATime, name: str) -> None:
        self.experts, self.name = experts, name

    def run(self, inputs: dict) -> dict:
        return self.experts.run_expert(self.name, inputs)


def build(ckpt: Checkpoint, variant: str, device: torch.device) -> Denoiser:
    """Both experts served as `variant`: resident (bf16, fp8), or one at a time (fp32)."""
    names = list(filter(ckpt.has_expert, EXPERTS))
    if variant == "fp32":
        one_at_a_time = OneExpertAtATime(ckpt, variant, device)
        experts = {name: _ExpertProxy(one_at_a_time, name) for name in names}
    else:
        experts = {name: build_expert(ckpt, name, variant, device) for name in names}
    return Denoiser(ckpt=ckpt, experts=experts, device=device, dtype=served_dtype(variant))


def run(ckpt: Checkpoint, variant: str, request: GenerationRequest, embeds: torch.Tensor, device) -> dict:
    denoiser = build(ckpt, variant, device)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(index: int, count: int) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            latents = denoiser(request, embeds.to(device), on_step=on_step).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    del denoiser
    # dynamo's caches keep the compiled experts referenced: without a reset they stay on the device through the next
    # variant, whose peak would count them.
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    # The first step compiles; the median of the others is the step time.
    timed = sorted(step_times[1:]) or step_times
    logger.info("%s: %d steps, median step %.3f s", variant, len(step_times), timed[len(timed) // 2])
    return {"latents": latents, "step_s": timed[len(timed) // 2], "first_step_s": step_times[0], "peak_gb": peak_gb}


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """The VAE output in [-1, 1] as 0..255 levels, as the served video maps it."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a configs-only A14B checkpoint")
    parser.add_argument("--size", default="480p", choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--fp32", action="store_true", help="also an fp32 reference run (small sizes)")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda")
    ckpt = Checkpoint.open(args.checkpoint)
    height, width, num_frames = SIZES[args.size]
    request = GenerationRequest(
        prompt="", negative_prompt="", height=height, width=width, num_frames=num_frames,
        num_inference_steps=args.steps, seed=0, guidance_scale=4.0, guidance_scale_2=3.0, fps=16,
    )  # fmt: skip
    embeds = torch.randn(2, TEXT_LEN, ckpt.text_dim, generator=torch.Generator().manual_seed(0))
    result: dict = {
        **run_record(torch.cuda.get_device_name()),
        "weights": "random (configs-only checkpoint, seeded): not a trained model",
        "size": args.size,
        "steps": args.steps,
        "runs": {},
    }
    variants = ["bf16", "fp8"] + (["fp32"] if args.fp32 else [])
    latents = {}
    for variant in variants:
        out = run(ckpt, variant, request, embeds, device)
        latents[variant] = out.pop("latents")
        result["runs"][variant] = out
        write_json(args.out, result)
    result["latents_rel_l2"] = {"fp8 vs bf16": rel_l2(latents["fp8"], latents["bf16"])}
    if "fp32" in latents:
        for variant in ("bf16", "fp8"):
            result["latents_rel_l2"][f"{variant} vs fp32"] = rel_l2(latents[variant], latents["fp32"])
    logger.info("final latents: %s", result["latents_rel_l2"])
    if not args.skip_decode:
        torch.manual_seed(WEIGHT_SEED)
        vae = VaeDecoder(ckpt, torch_vae_decode_fn(ckpt.load_vae(torch.float32, "cuda")), device, torch.float32)
        frames = {v: to_uint8(vae(latents[v])).cpu() for v in latents}
        result["frames_psnr_db"] = {"fp8 vs bf16": psnr(frames["fp8"], frames["bf16"])}
        if "fp32" in frames:
            for variant in ("bf16", "fp8"):
                result["frames_psnr_db"][f"{variant} vs fp32"] = psnr(frames[variant], frames["fp32"])
        logger.info("frames PSNR: %s", result["frames_psnr_db"])
    write_json(args.out, result)


if __name__ == "__main__":
    main()
