"""One guided denoising step of an image-conditioned Wan2.2 model: this project's step against diffusers', one run.

From a checkpoint (on a GPU host the configs-only shapes checkpoints: `python -m wan_build.shapes_checkpoint DIR
--kind i2v` for I2V-A14B, `--kind ti2v` for TI2V-5B; random bf16 weights built on the device), at one size:
  - diffusers: the first expert's forwards as the reference pipeline runs them, cond then uncond with the default
    attention processor, then the guidance combine. I2V-A14B as `WanImageToVideoPipeline` (the latents
    concatenated with the frame mask and the condition latents, 36 channels, one timestep); TI2V-5B as `WanPipeline`
    with `expand_timesteps` (one timestep per token, [1, tokens]), or with `--image` as `WanImageToVideoPipeline`
    (the first latent frame replaced by the condition, its tokens' timestep 0);
  - ours: `wan_triton.model.denoise.denoise_step` with the request's `Conditioning`, on the torch engine as
    `components.build_denoiser` makes it (`attention.install`: the chosen kernel and fused projections; `--compile`:
    regional torch.compile of every block): one batch-2 forward, the guidance combine and the UniPC update.
The condition latents are random (the VAE encode runs once per request, not per step). Writes JSON (--out) and
prints a table with each variant's median step time and peak device memory:

    python benchmarks/family_step.py --checkpoint /tmp/i2v_a14b --height 720 --width 1280 --num-frames 81 \
        --compile --out $OUT/family_step_i2v.json

On a CPU (`--device cpu`, float32, a tiny checkpoint) it runs the same code at toy sizes (tests/bench).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

from wan_bench.records import device_name, run_record, write_json
from wan_bench.timing import time_wall
from wan_triton.kernels import attention
from wan_triton.model.checkpoint import MAX_SEQUENCE_LENGTH, Checkpoint
from wan_triton.model.denoise import Conditioning, denoise_step, i2v_condition, initial_noise, latent_shape
from wan_triton.runtime.engines.torch_engine import denoiser_engine
from wan_triton.runtime.experts import compile_expert_blocks

logger = logging.getLogger("benchmarks.family_step")

GUIDANCE = 5.0


def conditioning(ckpt: Checkpoint, shape: tuple[int, ...], image: bool, device: torch.device) -> Conditioning:
    """The step's conditioning with random condition latents (`Denoiser.conditioning` without the VAE encode)."""
    g = torch.Generator().manual_seed(1)
    _, z, frames, h, w = shape
    if ckpt.image_to_video:
        latent = torch.randn(1, z, frames, h, w, generator=g)
        return Conditioning(concat=i2v_condition(latent, shape, ckpt.vae_scale_factor_temporal).to(device))
    if ckpt.expand_timesteps:
        first = torch.randn(1, z, 1, h, w, generator=g).to(device) if image else None
        return Conditioning(first_frame=first, frame_timesteps=True)
    raise SystemExit(f"{ckpt.root} is a text-to-video checkpoint: benchmarks/denoiser_step.py times its step")


def diffusers_inputs(ckpt: Checkpoint, latents: torch.Tensor, condition: Conditioning, t: torch.Tensor):
    """The expert's input and timestep exactly as the reference pipelines build them (their own code, restated)."""
    if ckpt.image_to_video:
        return torch.cat([latents, condition.concat], dim=1), t.expand(1)
    mask = torch.ones(latents.shape, dtype=torch.float32, device=latents.device)
    if condition.first_frame is not None:
        mask[:, :, 0] = 0
        latents = (1 - mask) * condition.first_frame + mask * latents
    _, p_h, p_w = ckpt.patch_size
    return latents, (mask[0][0][:, ::p_h, ::p_w] * t).flatten().unsqueeze(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--num-frames", type=int, required=True)
    parser.add_argument("--image", action="store_true", help="TI2V-5B: image-to-video (I2V always takes one)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--attention", default="auto", help="our attention kernel (wan_triton.kernels.attention)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of every block (ours)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cuda = device.type == "cuda"

    ckpt = Checkpoint.open(args.checkpoint)
    started = time.perf_counter()
    module = ckpt.load_transformer("transformer", dtype, str(device))
    params_b = sum(p.numel() for p in module.parameters()) / 1e9
    logger.info("built %s transformer (%.2f B params) in %.1f s", ckpt.kind, params_b, time.perf_counter() - started)

    shape = latent_shape(ckpt, args.height, args.width, args.num_frames)
    _, p_h, p_w = ckpt.patch_size
    tokens = shape[2] * (shape[3] // p_h) * (shape[4] // p_w)
    latents = initial_noise(shape, 0).to(device)
    text = torch.randn(2, MAX_SEQUENCE_LENGTH, ckpt.text_dim, generator=torch.Generator().manual_seed(2))
    text = text.to(device, dtype)
    condition = conditioning(ckpt, shape, args.image, device)
    solver = ckpt.make_solver()
    solver.set_timesteps(1000, device=device)
    t = solver.timesteps[100]

    result: dict = {
        **run_record(device_name(device)),
        "kind": ckpt.kind,
        "image": ckpt.image_to_video or args.image,
        "size": [args.height, args.width, args.num_frames],
        "latent_shape": list(shape),
        "tokens": tokens,
        "params_b": params_b,
        "variants": {},
    }

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def record(name: str, step) -> None:
        reset_peak()
        first_s, times = time_wall(step, device, args.repeat, after_warmup=reset_peak)
        result["variants"][name] = {
            "step_s": statistics.median(times),
            "times": times,
            "first_s": first_s,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        }
        logger.info("%s step: %.3f s (first %.1f s)", name, result["variants"][name]["step_s"], first_s)
        write_json(args.out, result)

    if not args.skip_diffusers:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        module.set_attn_processor(WanAttnProcessor())
        model_input, timestep = diffusers_inputs(ckpt, latents, condition, t)
        model_input = model_input.to(dtype)

        def diffusers_step() -> torch.Tensor:
            with torch.inference_mode():
                cond = module(model_input, timestep, text[0:1], return_dict=False)[0]
                uncond = module(model_input, timestep, text[1:2], return_dict=False)[0]
                return uncond + GUIDANCE * (cond - uncond)

        record("diffusers", diffusers_step)

    # As components.build_denoiser: kernel + fused projections (irreversible, so after the diffusers run).
    chosen = attention.install(module, args.attention, device)
    if args.compile:
        compile_expert_blocks(module, parallel=False)
    engine = denoiser_engine(module, device, dtype)
    state = {"latents": latents.clone()}

    def our_step() -> None:
        solver._step_index = None  # the same timestep every call: steps differ only by their input
        state["latents"] = denoise_step(engine, solver, state["latents"], t, text, GUIDANCE, None, condition)

    record(f"ours_{chosen.value}" + ("+compile" if args.compile else ""), our_step)

    print(f"\n{result['device']}  commit {result['commit']}  {ckpt.kind} {args.height}x{args.width}x{args.num_frames}")
    print(f"tokens {tokens}, {params_b:.2f} B params")
    base = result["variants"].get("diffusers", {}).get("step_s")
    print(f"{'variant':24} {'step s':>8} {'x diffusers':>11} {'peak GB':>8}")
    for name, entry in result["variants"].items():
        ratio = f"{base / entry['step_s']:.2f}" if base else "-"
        peak = "-" if entry["peak_gb"] is None else f"{entry['peak_gb']:.1f}"
        print(f"{name:24} {entry['step_s']:8.3f} {ratio:>11} {peak:>8}")


if __name__ == "__main__":
    main()
