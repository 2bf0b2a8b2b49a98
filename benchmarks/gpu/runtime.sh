#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The GPU runtime's checks and measurements on one GPU host, one command per call:
#   bash benchmarks/gpu/runtime.sh tests                the GPU tests (graphs bit-identical, swapping, numerics)
#   bash benchmarks/gpu/runtime.sh graphs SIZES...      step time eager vs CUDA graphs (benchmarks/step_variants.py)
#   bash benchmarks/gpu/runtime.sh swap SIZES...        step time and peak memory, experts resident vs swapped
#   bash benchmarks/gpu/runtime.sh swapgraphs SIZES...  swapped experts without and with CUDA graphs
# After `source .gpu-bundle/setup.sh` with the FlashAttention-4 add-on (benchmarks/gpu/common.sh). Results go to
# $OUT.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
mode=${1:?usage: runtime.sh tests | graphs|swap|swapgraphs SIZES...}
shift
case $mode in
  tests) run_gpu_tests ;;
  graphs) python benchmarks/step_variants.py --sizes "$@" --variants eager graphs --out "$OUT/graphs.json" ;;
  swap) python benchmarks/step_variants.py --sizes "$@" --variants resident swap --out "$OUT/swap.json" ;;
  swapgraphs) python benchmarks/step_variants.py --sizes "$@" --variants swap swap+graphs --out "$OUT/swapgraphs.json" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
