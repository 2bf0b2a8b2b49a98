"""benchmarks/vae_mp4.py on CPU at the smallest size: the GPU benchmark of the VAE decode and MP4 encode runs end to
end (A14B's VAE with random weights, fp32 and the half precisions asked for, each preset asked for, one after the
other and encoding while decoding) and records every row. One half precision and two presets keep it short; the
loops are the same for every precision and preset (the float16 decode's fallback to float32 has its own tests in
tests/unit/test_vae_half.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vae_mp4.py"


def _fastest_half() -> str:
    """The half precision this CPU convolves faster. CPUs without native float16 arithmetic run float16 3D
    convolutions a hundred times slower than float32 (6 s against 0.03 s for one 96-channel 4x32x32 convolution on
    an AVX-512 AMD EPYC, where bfloat16 took 0.004 s): the benchmark would take most of an hour there. The best of
    five, since the test may run beside others that load the CPU."""
    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, 2, 16, 16)
    seconds = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a thread barrier on a loaded CPU waits for a time slice, whatever the arithmetic
    try:
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            module, input_ = conv.to(dtype), x.to(dtype)
            times = []
            with torch.no_grad():
                module(input_)
                for _ in range(5):
                    started = time.perf_counter()
                    module(input_)
                    times.append(time.perf_counter() - started)
            seconds[name] = min(times)
    finally:
        torch.set_num_threads(threads)
    return min(seconds, key=seconds.get)


def test_records_every_decode_encode_and_overlapped_row(tmp_path):
    out = tmp_path / "vae_mp4.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--repeat", "1", "--out", str(out)]
    # `fast` (the default preset, the baseline's) runs whether asked for or not.
    half = _fastest_half()
    cmd += ["--presets", "veryfast", "--halves", half]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    record = json.loads(out.read_text())
    presets = ["fast", "veryfast"]
    assert set(record["decode"]) == {"fp32", half}
    assert set(record["encode"]) == set(presets)
    # The script itself asserts each overlapped MP4 equals encode_mp4 of its frames.
    tuned = (f"{half}_{p}{t}" for p in presets for t in ("", "_zerolatency"))
    assert set(record["while_decoding"]) == {"fp32_fast", *tuned}
    assert 0 <= record[f"{half}_vs_fp32_levels"]["mean"] <= record[f"{half}_vs_fp32_levels"]["max"]
    for row in record["encode"].values():
        assert row["bytes"] > 0 and 10 < row["psnr_db"] < 100, row
    assert all(row["together_s"] > 0 and 10 < row["psnr_db"] < 100 for row in record["while_decoding"].values())
    assert all(row["decode_to_frames_s"] > 0 and row["first_s"] > 0 for row in record["decode"].values())
