#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# What one GPU can measure of the parallel plans, one command per call:
#   bash benchmarks/gpu/parallel.sh compute ARGS...   benchmarks/parallel_compute.py ARGS (per-rank compute of
#                                                      every plan, rank 0 alone in a fake process group)
#   bash benchmarks/gpu/parallel.sh vae ARGS...       benchmarks/vae_decode.py ARGS
# After `source .gpu-bundle/setup.sh` (benchmarks/gpu/common.sh). Results go to $OUT.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
mode=${1:?usage: parallel.sh compute|vae ARGS...}
shift
case $mode in
  compute) python benchmarks/parallel_compute.py "$@" ;;
  vae) python benchmarks/vae_decode.py "$@" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
