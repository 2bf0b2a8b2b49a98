#!/usr/bin/env bash
# FlashAttention-3 against the served FlashAttention-4 on one GPU host, one mode per call (each fits 10 minutes):
#   bash benchmarks/gpu_attention.sh check      the GPU tests, then the attention kernels side by side
#                                              (benchmarks/block_profile.py --parts attention) at 720p and 480p
#   bash benchmarks/gpu_attention.sh step SIZE  the served step, flash4 vs flash3 (+ diffusers), denoiser_step.py
# Run from the project root after `source .gpukit/setup.sh`, the FlashAttention-4 add-on and
# `source benchmarks/setup_fa3.sh`, with the wheels the kit lacks (pydantic, pytest) in .whl/. Results go to $OUT.
set -euo pipefail
source "$(dirname "$0")/gpu_host_env.sh"
mode=$1
shift
case $mode in
  check)
    python3 -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1 | tee "$OUT/test_gpu.log"
    python3 benchmarks/block_profile.py --parts attention --sizes 720p 480p --shapes 2x40 1x40 2x20 1x10 \
      --tiles 0 6 --rounds 3 --repeat 3 --out "$OUT/attention_kernels.json" ;;
  step)
    python3 benchmarks/denoiser_step.py --sizes "$1" --backends flash4+compile flash3+compile flash4+compile \
      --out "$OUT/step_$1.json" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
