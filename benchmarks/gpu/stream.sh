#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The streaming endpoint on one GPU: the configs-only A14B checkpoint (random bf16 weights built on the device),
# gpu_a14b.yaml with its warm-up at 480p, then benchmarks/stream_overhead.py (the same 480p request through the
# unary ensemble and the streaming endpoint, alternated; same frames required), which gets this script's arguments:
#   bash benchmarks/gpu/stream.sh --steps 4 --preview 2 --pairs 2
# After `source .gpu-bundle/setup.sh` (benchmarks/gpu/common.sh). Results and the server log go to $OUT.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
python -m wan_bench.deployments --deployment model_repository/deployments/gpu_a14b.yaml --warmup 480x832x81 \
  --out /tmp/deployment_stream.json
render_repo /tmp/deployment_stream.json /tmp/repo_stream
echo "setup took $SECONDS s"
python benchmarks/stream_overhead.py --repo /tmp/repo_stream --height 480 --width 832 --num-frames 81 \
  --log "$OUT/tritonserver_stream.log" --out "$OUT/stream_overhead_480p.json" "$@"
