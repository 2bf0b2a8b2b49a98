#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# End to end through Triton on a GPU host: the configs-only A14B checkpoint (random bf16 weights built on the
# device), a GPU deployment ($DEPLOYMENT, default gpu_a14b.yaml on one GPU; gpu_a14b_cfg2.yaml for two), requests
# through the gRPC client, and Triton's per-model statistics for the breakdown (benchmarks/e2e_triton.py, which
# gets this script's arguments):
#   bash benchmarks/gpu/e2e.sh --height 480 --width 832 --num-frames 81 --steps 4 --requests 2
# After `source .gpu-bundle/setup.sh` (benchmarks/gpu/common.sh). Results and the server log go to $OUT.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
DEPLOYMENT=${DEPLOYMENT:-model_repository/deployments/gpu_a14b.yaml}
render_repo "$DEPLOYMENT" /tmp/repo
status=0
python benchmarks/e2e_triton.py --repo /tmp/repo --out "$OUT/e2e.json" "$@" || status=$?
cp /tmp/tritonserver.log "$OUT/tritonserver.log"
exit $status
