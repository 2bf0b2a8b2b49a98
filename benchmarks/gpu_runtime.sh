#!/usr/bin/env bash
# GPU-runtime checks and measurements of issue 3 on one GPU host, in one command per call:
#   bash benchmarks/gpu_runtime.sh tests              tests/test_gpu.py (graphs bit-identical, swapping, numerics)
#   bash benchmarks/gpu_runtime.sh graphs SIZES...    step time eager vs CUDA graphs (benchmarks/step_variants.py)
#   bash benchmarks/gpu_runtime.sh swap SIZES...      step time and peak memory, experts resident vs swapped
# Run from the project root after `source .gpukit/setup.sh` (+ the FlashAttention-4 add-on), with the wheels the
# kit lacks (pydantic, pytest) in .whl/. Results go to $OUT.
set -euo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
# The host's own site-packages first: its scipy and sklearn need its numpy 2 (the kit's numpy 1.26 is for Triton).
HOST_SITE=$(ls -d /opt/torch/.venv/lib/python3*/site-packages 2>/dev/null | head -1)
export PYTHONPATH=$HOST_SITE:/tmp/site PYTHONUNBUFFERED=1
export COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mode=$1
shift
case $mode in
  tests) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" ;;
  graphs) python3 benchmarks/step_variants.py --sizes "$@" --variants eager graphs --out "$OUT/graphs.json" ;;
  swap) python3 benchmarks/step_variants.py --sizes "$@" --variants resident swap --out "$OUT/swap.json" ;;
  swapgraphs) python3 benchmarks/step_variants.py --sizes "$@" --variants swap swap+graphs --out "$OUT/swapgraphs.json" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
