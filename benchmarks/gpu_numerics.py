"""bf16 GPU denoising against an fp32 reference over all steps, on a reduced-width Wan2.2 model.

Both runs go through this project's own path (`components.build_denoiser` -> `Denoiser`): the reference with
fp32 weights, diffusers' attention processor and TF32 off; the served configuration with bf16 weights, the fastest
attention kernel (FlashAttention-4 when installed), fused projections and regional torch.compile. Same prompt
embeddings, seed and schedule; reports the relative L2 of the final latents (target <= 2e-2). Usage on a GPU host:

    python benchmarks/gpu_numerics.py --out $OUT/numerics.json
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from wan_bench.records import run_record, write_json
from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint
from wan_triton.components import build_denoiser
from wan_triton.config.deployment import ComponentConfig, EngineKind
from wan_triton.config.request import GenerationRequest
from wan_triton.model.checkpoint import Checkpoint

logger = logging.getLogger("benchmarks.gpu_numerics")

# The A14B head layout (40 x 128 -> here 12 x 128) and patching, fewer layers and a narrower FFN/text width.
REDUCED = TinyConfig(
    num_layers=4,
    num_attention_heads=12,
    attention_head_dim=128,
    ffn_dim=4096,
    text_dim=512,
    text_layers=1,
    text_heads=8,
    text_ff=512,
    vae_base_dim=8,
    flow_shift=12.0,
    seed=0,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=416)
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    ckpt = Checkpoint.open(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "reduced", REDUCED))
    request = GenerationRequest(
        prompt="-",
        negative_prompt="-",
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_inference_steps=args.steps,
        seed=1234,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        fps=16,
    )
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 512, REDUCED.text_dim, generator=gen)
    embeds[:, 40:] = 0  # zero past the prompt length, as the text stage leaves them

    results = {**run_record(torch.cuda.get_device_name()), "config": vars(REDUCED), "request": vars(request)}
    latents = {}
    variants = {
        "fp32_reference": ComponentConfig(
            engine=EngineKind.TORCH, device="cuda", precision="float32", attention="reference"
        ),
        "bf16_served": ComponentConfig(
            engine=EngineKind.TORCH, device="cuda", precision="bfloat16", attention="auto", compile_blocks=True
        ),
    }
    for name, cfg in variants.items():
        torch.backends.cuda.matmul.allow_tf32 = name != "fp32_reference"
        torch.backends.cudnn.allow_tf32 = name != "fp32_reference"
        denoiser = build_denoiser(ckpt, cfg, Path("/nonexistent"))
        started = time.perf_counter()
        latents[name] = denoiser(request, embeds).float().cpu()
        results[f"{name}_s"] = time.perf_counter() - started
        del denoiser
        torch.cuda.empty_cache()
    ref, got = latents["fp32_reference"], latents["bf16_served"]
    results["rel_l2"] = float((got - ref).norm() / ref.norm())
    results["max_abs"] = float((got - ref).abs().max())
    results["finite"] = bool(torch.isfinite(got).all())
    write_json(args.out, results)
    print(
        f"final latents, bf16 served vs fp32 reference over {args.steps} steps: rel-L2 {results['rel_l2']:.3e}, "
        f"max-abs {results['max_abs']:.3e}, finite {results['finite']} (target rel-L2 <= 2e-2)"
    )


if __name__ == "__main__":
    main()
