"""Wan VAE decode on a GPU: this project's decoder (wan_triton.model.vae.VaeDecoder on the torch engine) in fp32 and
bf16, time, peak memory and the bf16 output's error against fp32, at 480p and 720p (21 latent frames).

The VAE has random weights built on the device from its real config (speed does not depend on weight values).
diffusers' own figures on H100 (BASELINES.md): fp32 3.25 s / 9.3 GB at 480p, 7.63 s / 20.7 GB at 720p;
bf16 2.07 s / 4.7 GB and 4.75 s / 10.4 GB. Usage on a GPU host:

    python benchmarks/vae_decode.py --out $OUT/vae.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python_backend"), str(ROOT / "build")]

from wan_build.shapes_checkpoint import make_shapes_checkpoint  # noqa: E402
from wan_triton.model.checkpoint import Checkpoint  # noqa: E402
from wan_triton.model.vae import VaeDecoder, torch_vae_decode_fn  # noqa: E402

SIZES = {"480p": (480, 832), "720p": (720, 1280)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
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
        "device": torch.cuda.get_device_name(),
        "commit": os.environ.get("COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "sizes": {},
    }
    for size in args.sizes:
        height, width = SIZES[size]
        latents = torch.randn(
            1, 16, 21, height // 8, width // 8, device=device, generator=torch.Generator("cuda").manual_seed(0)
        )
        entry, outputs = {}, {}
        for name, vae, dtype in (("fp32", vae32, torch.float32), ("bf16", vae16, torch.bfloat16)):
            decoder = VaeDecoder(ckpt, torch_vae_decode_fn(vae), device, dtype)
            decoder(latents)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                video = decoder(latents)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            outputs[name] = video.float()
            entry[name] = {
                "decode_s": statistics.median(times),
                "times": times,
                "peak_activation_gb": (torch.cuda.max_memory_allocated() - base) / 1e9,
            }
            del video
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
