"""The VAE decode and MP4 encode of one video on a GPU, before and after the fast options: the fp32 decode against
the bf16 and fp16 ones (deployment `components.vae_decoder.precision: bfloat16 | float16`; fp16 as served, with its
float32 fallback for a clip that overflows), each to uint8 frames, the H.264 encode of those frames at x264 presets
(deployment `video.x264_preset`; `fast` is the default), with each half-precision decode's distance from the fp32
frames in uint8 levels, and the two run together, each chunk encoded while the next decodes (deployment
`video.encode_while_decoding`), with each x264 tune asked for (`video.x264_tune`); with `--compile`, the
half-precision decodes with their phases compiled too (`components.vae_decoder.compile_phases`).

The VAE has random weights built on the device from the A14B config (speed does not depend on weight values). On a
GPU host (`benchmarks/gpu/distill4.sh` runs it):

    python benchmarks/vae_mp4.py --out $OUT/vae_mp4.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wan_bench.experts import SIZES, latent_shape
from wan_bench.mp4 import add_tunes_argument, psnr_db, tune_of
from wan_bench.records import run_record, write_json
from wan_bench.timing import time_wall
from wan_build.shapes_checkpoint import make_shapes_checkpoint
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.vae import VaeDecoder, torch_vae_decode_chunks_fn, torch_vae_decode_fn
from wan_triton.model.vae_chunks import TorchVaeDecoder
from wan_triton.model.video import X264_PRESET, decode_mp4, encode_mp4

PRESETS = (X264_PRESET, "veryfast", "superfast", "ultrafast")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="720p", choices=list(SIZES))
    # The figures are the GPU's; `cpu` (with a small size) only checks that the script runs.
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--crf", type=int, default=17)
    # Fewer presets and half precisions for a shorter run; the fp32 decode with the default preset (the baseline)
    # always runs.
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--halves", nargs="+", default=list(HALF), choices=list(HALF))
    # The x264 tunes of the half-precision decodes' runs that encode while decoding ("none": x264's default).
    add_tunes_argument(parser)
    # Also each half precision with its decode phases compiled (`components.vae_decoder.compile_phases`); the first,
    # compiling decode is recorded as `first_s`.
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    ckpt = Checkpoint.open(make_shapes_checkpoint(Path(tempfile.mkdtemp()) / "a14b"))
    device = torch.device(args.device)
    vae32 = ckpt.load_vae(torch.float32, str(device))
    halves = {name: HALF[name] for name in args.halves}
    presets = [X264_PRESET, *(p for p in args.presets if p != X264_PRESET)]
    vaes = {"fp32": (vae32, torch.float32)}
    for name, dtype in halves.items():
        vae = ckpt.load_vae(dtype, str(device))
        vae.load_state_dict(vae32.state_dict())  # the same weights in half precision
        vaes[name] = (vae, dtype)
    latents = torch.randn(
        latent_shape(SIZES[args.size]), device=device, generator=torch.Generator(device).manual_seed(0)
    )
    result = {
        **run_record(),
        "size": args.size,
        "crf": args.crf,
        "decode": {},
        "encode": {},
    }
    frames: dict[str, np.ndarray] = {}
    decoders = {}
    variants = [(name, vae, dtype, False) for name, (vae, dtype) in vaes.items()]
    if args.compile:
        variants += [(f"{name}+compile", vaes[name][0], dtype, True) for name, dtype in halves.items()]
    for name, vae, dtype, compiled in variants:
        # fp16 as the server runs it: checked for overflow, the fp32 decoder standing by (components.py).
        fallback = (lambda: decoders["fp32"]) if dtype == torch.float16 else None
        if compiled:  # as `components.vae_decoder.compile_phases` builds it
            phases = TorchVaeDecoder(vae, whole_post_quant_conv=True)
            try:
                phases.compile()
            except RuntimeError as exc:  # a torch that cannot compile them: the other variants' figures still count
                print(f"{name}: {exc}")
                result["decode"][name] = {"error": str(exc)}
                continue
            decoder = VaeDecoder(ckpt, phases.decode, device, dtype, phases.decode_chunks, fallback)
        else:
            decoder = VaeDecoder(
                ckpt, torch_vae_decode_fn(vae), device, dtype, torch_vae_decode_chunks_fn(vae), fallback
            )
        decoders[name] = decoder
        last: dict = {}

        def decode(decoder=decoder, last=last) -> None:
            last["frames"] = decoder.frames(latents)  # to uint8 frames on the host, as the server's step does

        first_s, times = time_wall(decode, device, args.repeat)
        frames[name] = last["frames"]
        result["decode"][name] = {"decode_to_frames_s": statistics.median(times), "times": times, "first_s": first_s}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    halves_decoded = [name for name, *_ in variants if name != "fp32" and name in frames]
    for name in halves_decoded:
        diff = np.abs(frames[name].astype(np.int16) - frames["fp32"])
        result[f"{name}_vs_fp32_levels"] = {"max": int(diff.max()), "mean": float(diff.mean())}
    for preset in presets:
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            data = encode_mp4(frames["fp32"], 16, preset=preset, crf=args.crf)
            times.append(time.perf_counter() - started)
        result["encode"][preset] = {
            "encode_s": statistics.median(times),
            "times": times,
            "bytes": len(data),
            # Quality beside size: the decoded MP4 against the frames it was made from (random weights make
            # noise-like frames, the hardest content for x264, so these are lower than a real video's).
            "psnr_db": psnr_db(decode_mp4(data), frames["fp32"]),
        }
    # Both at once, as the vae_decoder step runs them with `video.encode_while_decoding`: each chunk encoded on a
    # worker thread while the next decodes.
    result["while_decoding"] = {}
    runs = [("fp32", X264_PRESET, "none"), *((h, p, t) for h in halves_decoded for p in presets for t in args.tunes)]
    for name, preset, tune_name in runs:
        last = {}
        tune = tune_of(tune_name)

        def both(decoder=decoders[name], preset=preset, tune=tune, last=last) -> None:
            last["frames"], last["mp4"] = decoder.frames_and_mp4(latents, 16, preset, args.crf, tune)

        _, times = time_wall(both, device, args.repeat)
        assert last["mp4"] == encode_mp4(last["frames"], 16, preset=preset, crf=args.crf, tune=tune)
        key = f"{name}_{preset}" if tune is None else f"{name}_{preset}_{tune}"
        result["while_decoding"][key] = {
            "together_s": statistics.median(times),
            "times": times,
            "bytes": len(last["mp4"]),
            "psnr_db": psnr_db(decode_mp4(last["mp4"]), last["frames"]),
        }
        print(f"{name} decode with {preset} ({tune_name}) encode while decoding: {statistics.median(times):.2f} s")
    base = result["decode"]["fp32"]["decode_to_frames_s"] + result["encode"][X264_PRESET]["encode_s"]
    print(f"before: fp32 decode + {X264_PRESET} encode {base:.2f} s")
    for name in halves_decoded:
        for preset in presets:
            total = result["decode"][name]["decode_to_frames_s"] + result["encode"][preset]["encode_s"]
            encoded = result["encode"][preset]
            print(
                f"{name} decode + {preset} encode {total:.2f} s ({encoded['bytes'] / 1e6:.1f} MB, "
                f"{encoded['psnr_db']:.2f} dB)"
            )
        print(f"{name} vs fp32 frames: {result[f'{name}_vs_fp32_levels']}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
