"""VAE decode on one rank vs split by width over N ranks (wan_triton.parallel.vae_split), measured on ONE GPU.

The ranks of a split are symmetric (each decodes w/N latent columns, plus one halo column per side and 3x3
convolution), so rank 0's time is the split's compute. This script decodes as rank 0 of a fake process group of N
(torch.distributed's `fake_pg`), its all-gathers and the final gather replaced by local copies of this rank's
data (the fake group leaves outputs unwritten; `wan_bench.fake_world`). It counts them (calls and bytes) and prices
the communication with `wan_bench.perf_model` at the NCCL bus bandwidth given (default: the all-to-all bus
bandwidth measured on 2x H200, NV18, and 20 us a call; benchmarks/RESULTS.md). The N = 1 row is the served
one-GPU decode (`VaeDecoder` over diffusers' AutoencoderKLWan), in the same run.

The VAE has random weights (A14B's Wan 2.1 VAE config) built on the device; 81 frames (21 latent frames).

    python benchmarks/vae_split.py --sizes 720p --splits 1 2 4 8 --out $OUT/vae_split.json     # a GPU host
    python benchmarks/vae_split.py --device cpu --sizes tiny --splits 1 2 --out out/vae_split_tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

import torch

from wan_bench.experts import SIZES, latent_shape
from wan_bench.fake_world import GatherCounter, fake_world
from wan_bench.memory import peak_above, release, reset_peak
from wan_bench.perf_model import Bandwidth, Collective, collective_seconds
from wan_bench.records import device_name, run_record, write_json
from wan_bench.timing import time_wall
from wan_build.shapes_checkpoint import make_shapes_checkpoint
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.vae import VaeDecoder, torch_vae_decode_fn

# (height, width, frames): 81 frames are 21 latent frames; the tiny size 5 frames, 2 latent frames.
VAE_SIZES = {"480p": SIZES["480p"], "720p": SIZES["720p"], "tiny": (32, 64, 5)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(ckpt: Checkpoint, size: tuple[int, int, int], dtype, splits: int, device, repeat: int) -> dict:
    from wan_triton.parallel.vae_split import split_decode_fn, split_vae_decoder

    gen = torch.Generator(device.type).manual_seed(0)
    latents = torch.randn(latent_shape(size), device=device, generator=gen)
    vae = ckpt.load_vae(dtype, str(device))
    counter = GatherCounter()
    with contextlib.ExitStack() as stack:
        if splits > 1:
            import torch.distributed as dist

            stack.enter_context(fake_world(splits))
            decode_fn = split_decode_fn(split_vae_decoder(vae, dist.group.WORLD), dist.group.WORLD)
        else:
            decode_fn = torch_vae_decode_fn(vae)
        decoder = VaeDecoder(ckpt, decode_fn, device, dtype)
        last: dict = {}
        memory: dict = {}

        def decode(decoder=decoder) -> None:
            last["video"] = decoder(latents)
            counter.counting = False  # the first timed call's collectives only

        def after_warmup() -> None:
            last.clear()  # the warm-up's video
            memory["base"] = reset_peak(device)
            counter.counting = True

        with counter.installed():
            _, times = time_wall(decode, device, repeat, after_warmup)
        peak = peak_above(device, memory["base"])
    video = last.pop("video")
    entry = {
        "splits": splits,
        "decode_s": statistics.median(times),
        "times": times,
        "peak_activation_gb": None if peak is None else peak / 1e9,
        "all_gather_calls": len(counter.bytes),
        "all_gather_input_bytes": sum(counter.bytes),
        "frames_shape": list(video.shape),
    }
    del video, decode, decoder, vae
    release(device)
    return entry


def comm_seconds(entry: dict, bw: Bandwidth) -> float:
    n = entry["splits"]
    if n == 1:
        return 0.0
    calls, total = entry["all_gather_calls"], entry["all_gather_input_bytes"]
    # The model prices a collective as latency + bytes x factor / busbw; summing per call is the same as pricing
    # the total bytes once plus latency per call.
    return collective_seconds(Collective("all_gather", n, total, 1), bw) + (calls - 1) * bw.latency_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--sizes", nargs="+", default=["720p"], choices=list(VAE_SIZES))
    parser.add_argument("--splits", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--all-gather-gbps", type=float, default=295.0, help="NCCL bus bandwidth, GB/s")
    parser.add_argument("--latency-us", type=float, default=20.0, help="fixed cost of one collective call")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    # As the server runs: PyTorch's defaults (cuDNN TF32 on, matmul TF32 off).
    bw = Bandwidth(
        all_reduce=0.0, all_to_all=0.0, all_gather=args.all_gather_gbps * 1e9, latency_s=args.latency_us * 1e-6
    )
    ckpt = Checkpoint.open(make_shapes_checkpoint(Path(tempfile.mkdtemp()) / "a14b"))
    result = {
        **run_record(device_name(device)),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "bandwidth": {"all_gather": bw.all_gather, "latency_s": bw.latency_s},
        "sizes": {},
    }
    print(f"{'size':5} {'prec':5} {'N':>2} {'decode s':>9} {'comm s':>7} {'total s':>8} {'speedup':>8} {'peak GB':>8}")
    for size_name in args.sizes:
        result["sizes"][size_name] = {}
        for precision in args.precisions:
            rows = []
            for n in args.splits:
                entry = measure(ckpt, VAE_SIZES[size_name], DTYPES[precision], n, device, args.repeat)
                entry["comm_s_predicted"] = comm_seconds(entry, bw)
                entry["total_s_predicted"] = entry["decode_s"] + entry["comm_s_predicted"]
                rows.append(entry)
                one = rows[0]["decode_s"] if rows[0]["splits"] == 1 else float("nan")
                entry["speedup_predicted"] = one / entry["total_s_predicted"]
                peak = "-" if entry["peak_activation_gb"] is None else f"{entry['peak_activation_gb']:.1f}"
                print(
                    f"{size_name:5} {precision:5} {n:2} {entry['decode_s']:9.3f} {entry['comm_s_predicted']:7.3f} "
                    f"{entry['total_s_predicted']:8.3f} {entry['speedup_predicted']:8.2f} {peak:>8}",
                    flush=True,
                )
            result["sizes"][size_name][precision] = rows
            write_json(args.out, result)


if __name__ == "__main__":
    main()
