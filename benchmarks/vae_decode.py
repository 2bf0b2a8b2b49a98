"""Wan VAE decode on a GPU: this project's decoder (wan_triton.model.vae.VaeDecoder on the torch engine) in fp32 and
bf16, time, peak memory and the bf16 output's error against fp32, at 480p and 720p (21 latent frames).

The VAE has random weights built on the device from its real config (speed does not depend on weight values);
benchmarks/RESULTS.md sets the figures beside diffusers' own. On a GPU host (`benchmarks/gpu/parallel.sh vae` runs
it):

    python benchmarks/vae_decode.py --out $OUT/vae.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from wan_bench.experts import SIZES, latent_shape
from wan_bench.memory import peak_above, reset_peak
from wan_bench.records import run_record, write_json
from wan_bench.timing import time_wall
from wan_build.shapes_checkpoint import make_shapes_checkpoint
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.vae import VaeDecoder, torch_vae_decode_fn

VAE_SIZES = ("480p", "720p")  # 81 frames: 21 latent frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(VAE_SIZES), choices=VAE_SIZES)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--tf32",
        choices=["off", "serving"],
        default="off",
        help="off: a strict fp32 reference; serving: PyTorch's defaults, as the server runs (cuDNN TF32 on)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.tf32 == "off":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    ckpt = Checkpoint.open(make_shapes_checkpoint(Path(tempfile.mkdtemp()) / "a14b"))
    device = torch.device("cuda")
    vae32 = ckpt.load_vae(torch.float32, "cuda")
    vae16 = ckpt.load_vae(torch.bfloat16, "cuda")
    vae16.load_state_dict(vae32.state_dict())  # same weights, bf16
    result = {
        **run_record(torch.cuda.get_device_name()),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "sizes": {},
    }
    for size in args.sizes:
        gen = torch.Generator("cuda").manual_seed(0)
        latents = torch.randn(latent_shape(SIZES[size]), device=device, generator=gen)
        entry, outputs = {}, {}
        for name, vae, dtype in (("fp32", vae32, torch.float32), ("bf16", vae16, torch.bfloat16)):
            decoder = VaeDecoder(ckpt, torch_vae_decode_fn(vae), device, dtype)
            last: dict = {}
            memory: dict = {}

            def decode(decoder=decoder, last=last) -> None:
                last["video"] = decoder(latents)

            def after_warmup(memory=memory, last=last) -> None:
                last.clear()  # the warm-up's video
                memory["base"] = reset_peak(device)

            _, times = time_wall(decode, device, args.repeat, after_warmup)
            outputs[name] = last.pop("video").float()
            entry[name] = {
                "decode_s": statistics.median(times),
                "times": times,
                "peak_activation_gb": peak_above(device, memory["base"]) / 1e9,
            }
        ref, got = outputs["fp32"], outputs["bf16"]
        entry["bf16_rel_l2"] = float((got - ref).norm() / ref.norm())
        # In uint8 levels, what a viewer sees: (x / 2 + 0.5) * 255.
        entry["bf16_mean_abs_levels"] = float((got - ref).abs().mean() * 127.5)
        result["sizes"][size] = entry
        print(
            f"{size}: fp32 {entry['fp32']['decode_s']:.2f} s {entry['fp32']['peak_activation_gb']:.1f} GB | "
            f"bf16 {entry['bf16']['decode_s']:.2f} s {entry['bf16']['peak_activation_gb']:.1f} GB | "
            f"bf16 vs fp32 rel-L2 {entry['bf16_rel_l2']:.2e}, mean {entry['bf16_mean_abs_levels']:.2f} levels",
            flush=True,
        )
        del outputs, ref, got
        torch.cuda.empty_cache()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
