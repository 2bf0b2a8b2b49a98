#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# FlashAttention-3 against the served FlashAttention-4 on one GPU host, one mode per call:
#   bash benchmarks/gpu/attention.sh check      the GPU tests, then the attention kernels side by side
#                                              (benchmarks/block_profile.py --parts attention) at 720p and 480p
#   bash benchmarks/gpu/attention.sh step SIZE  the served step, flash4 vs flash3 (+ diffusers), denoiser_step.py
# After `source .gpu-bundle/setup.sh` with both FlashAttention add-ons (benchmarks/gpu/common.sh). Results go to $OUT.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
mode=${1:?usage: attention.sh check | step SIZE}
shift
case $mode in
  check)
    run_gpu_tests
    python benchmarks/block_profile.py --parts attention --sizes 720p 480p --shapes 2x40 1x40 2x20 1x10 \
      --tiles 0 6 --rounds 3 --repeat 3 --out "$OUT/attention_kernels.json" ;;
  step)
    size=${1:?usage: attention.sh step SIZE}
    python benchmarks/denoiser_step.py --sizes "$size" --backends flash4+compile flash3+compile flash4+compile \
      --out "$OUT/step_$size.json" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
