#!/usr/bin/env bash
# Issue 4's measurements that one GPU can make, in one command per call (see benchmarks/RESULTS.md):
#   bash benchmarks/gpu_parallel.sh compute ARGS...   benchmarks/parallel_compute.py ARGS (per-rank compute of
#                                                      every plan, rank 0 alone in a fake process group)
#   bash benchmarks/gpu_parallel.sh vae ARGS...       benchmarks/vae_decode.py ARGS
# Run from the project root after `source .gpukit/setup.sh` (+ the FlashAttention-4 add-on), with the wheels the
# kit lacks (pydantic, pytest) in .whl/. Results go to $OUT.
set -euo pipefail
source "$(dirname "$0")/gpu_host_env.sh"
mode=$1
shift
case $mode in
  compute) python3 benchmarks/parallel_compute.py "$@" ;;
  vae) python3 benchmarks/vae_decode.py "$@" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
