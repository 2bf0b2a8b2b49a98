"""The MP4 encode as `video.encode_while_decoding` runs it, on the host's CPU alone: frames handed to the encoder's
worker thread a decoded chunk at a time (1 frame, then 4 at a time, as the VAE decodes them) at the pace of a GPU
decode, for each x264 preset and tune asked for (deployment `video.x264_preset`, `video.x264_tune`). What it times is
what the request waits for after its last chunk decodes: the encoder's `tail_s`, from the last chunk handed over to
the finished MP4. Beside it, the MP4's size and PSNR against the frames.

The frames are made here, no GPU or model needed: a moving pattern with Gaussian noise of each `--noise` level (the
random-weight VAE's frames are noise-like, the hardest content for x264; a trained model's are smoother).

    python benchmarks/mp4_encode.py --out benchmarks/results/vae/mp4_encode_720p.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from wan_bench.mp4 import add_tunes_argument, psnr_db, tune_of
from wan_bench.records import run_record, write_json
from wan_triton.model.video import X264_PRESETS, BackgroundMp4Encoder, decode_mp4

SIZES = {"720p": (720, 1280), "480p": (480, 832), "tiny": (64, 96)}
# The pace of the served 720p decode: 5.5 s for 21 latent frames on an H100 (benchmarks/RESULTS.md, End to end).
CHUNK_S = 5.5 / 21
FRAMES_PER_CHUNK = 4


def make_frames(num_frames: int, height: int, width: int, noise: float, seed: int = 0) -> np.ndarray:
    """uint8 RGB frames [F, H, W, 3]: two drifting waves per channel plus Gaussian noise of standard deviation
    `noise` levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        wave = (np.sin((x + 6 * t) / 40) + np.cos((y - 3 * t) / 55)) * 60 + 128
        image = np.stack([wave, np.roll(wave, 17 * t, axis=1), 255 - wave], -1)
        frames[t] = np.clip(image + rng.normal(0, noise, image.shape), 0, 255)
    return frames


def chunks(frames: np.ndarray) -> list[np.ndarray]:
    """The frames as the chunked decode gives them: the first alone, then 4 at a time."""
    return [frames[:1], *(frames[k : k + FRAMES_PER_CHUNK] for k in range(1, len(frames), FRAMES_PER_CHUNK))]


def encode_paced(frames: np.ndarray, fps: int, preset: str, crf: int, tune: str | None, chunk_s: float) -> dict:
    """Hands the chunks over `chunk_s` apart, as the decode makes them; times the wait after the last one."""
    encoder = BackgroundMp4Encoder(fps, preset, crf, tune)
    try:
        started = time.perf_counter()
        for chunk in chunks(frames):
            time.sleep(chunk_s)  # the chunk's decode
            encoder.add(chunk)
        last_added = time.perf_counter()
        data = encoder.finish()
        finished = time.perf_counter()
    finally:
        encoder.close()
    return {"tail_s": finished - last_added, "total_s": finished - started, "bytes": len(data), "mp4": data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="720p", choices=list(SIZES))
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--chunk-s", type=float, default=CHUNK_S, help="seconds between decoded chunks")
    parser.add_argument("--presets", nargs="+", default=["veryfast"], choices=X264_PRESETS)
    add_tunes_argument(parser)
    parser.add_argument("--noise", nargs="+", type=float, default=[6.0, 40.0], help="noise levels of the content")
    parser.add_argument("--crf", type=int, default=17)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    height, width = SIZES[args.size]
    result = {**run_record(), "size": args.size, "num_frames": args.num_frames, "chunk_s": args.chunk_s, "rows": []}
    for noise in args.noise:
        frames = make_frames(args.num_frames, height, width, noise)
        for preset in args.presets:
            for tune_name in args.tunes:
                tune = tune_of(tune_name)
                runs = [encode_paced(frames, 16, preset, args.crf, tune, args.chunk_s) for _ in range(args.repeat)]
                row = {
                    "noise": noise,
                    "preset": preset,
                    "tune": tune_name,
                    "tail_s": statistics.median(r["tail_s"] for r in runs),
                    "tail_times": [r["tail_s"] for r in runs],
                    "total_s": statistics.median(r["total_s"] for r in runs),
                    "bytes": runs[0]["bytes"],
                    "psnr_db": psnr_db(decode_mp4(runs[0]["mp4"]), frames),
                }
                result["rows"].append(row)
                print(
                    f"noise {noise:g}, {preset}, tune {tune_name}: tail {row['tail_s']:.3f} s, "
                    f"{row['bytes'] / 1e6:.2f} MB, {row['psnr_db']:.2f} dB",
                    flush=True,
                )
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
