#!/usr/bin/env bash
# GPU-runtime checks and measurements of issue 3 on one GPU host, in one command per call:
#   bash benchmarks/gpu_runtime.sh tests              tests/gpu (graphs bit-identical, swapping, numerics)
#   bash benchmarks/gpu_runtime.sh graphs SIZES...    step time eager vs CUDA graphs (benchmarks/step_variants.py)
#   bash benchmarks/gpu_runtime.sh swap SIZES...      step time and peak memory, experts resident vs swapped
# Run from the project root after `source .gpukit/setup.sh` (+ the FlashAttention-4 add-on), with the wheels the
# kit lacks (pydantic, pytest) in .whl/. Results go to $OUT.
set -euo pipefail
source "$(dirname "$0")/gpu_host_env.sh"
mode=$1
shift
case $mode in
  tests) python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/test_gpu.log" ;;
  graphs) python3 benchmarks/step_variants.py --sizes "$@" --variants eager graphs --out "$OUT/graphs.json" ;;
  swap) python3 benchmarks/step_variants.py --sizes "$@" --variants resident swap --out "$OUT/swap.json" ;;
  swapgraphs) python3 benchmarks/step_variants.py --sizes "$@" --variants swap swap+graphs --out "$OUT/swapgraphs.json" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
