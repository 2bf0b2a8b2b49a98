#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The 4-step fast mode end to end through Triton on one GPU: gpu_a14b_distill4.yaml built from the configs-only A14B
# checkpoint with random LoRAs of the published distill LoRAs' layout and rank ($RANK, default 64;
# `python -m wan_build.random_lora`), fused into the experts at load; one server, then 720p and 480p (81 frames,
# 4 steps, guidance off; $REQUESTS timed requests each, default 2) through the gRPC client with Triton's per-stage
# table (benchmarks/e2e_triton.py), and the VAE decode + MP4 encode alone at 720p, fp32 against bf16 and fp16 decodes,
# x264 presets, one after the other and encoding while decoding (benchmarks/vae_mp4.py).
#   bash benchmarks/gpu/distill4.sh [vae|e2e|all]
# After `source .gpu-bundle/setup.sh` (benchmarks/gpu/common.sh). `vae` takes about 5 minutes on one H200, `e2e` about
# 7 (the server's load alone about 4); each fits a 10-minute run, `all` (the default) may not. Results, the build
# output and the server log go to $OUT.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
PART=${1:-all}
case "$PART" in vae | e2e | all) ;; *) echo "usage: $0 [vae|e2e|all]" >&2; exit 2 ;; esac
RANK=${RANK:-64}
REQUESTS=${REQUESTS:-2}
DEPLOYMENT=model_repository/deployments/gpu_a14b_distill4.yaml
REPO=/tmp/repo_distill4
PORTS=(--http-port 8100 --grpc-port 8101 --metrics-port 8102)

status=0
if [[ $PART != e2e ]]; then
  python benchmarks/vae_mp4.py --out "$OUT/vae_mp4.json" || status=$?
  [[ $PART == vae ]] && exit $status
fi

a14b_checkpoint
# The paths gpu_a14b_distill4.yaml names, relative to the project root.
python -m wan_build.random_lora /tmp/a14b artifacts/loras/distill4_high_noise.safetensors --expert transformer \
  --rank "$RANK" --seed 1
python -m wan_build.random_lora /tmp/a14b artifacts/loras/distill4_low_noise.safetensors --expert transformer_2 \
  --rank "$RANK" --seed 2
render_repo "$DEPLOYMENT" "$REPO" 2>&1 | tee "$OUT/distill4_build.log"

python -m wan_triton.tritonserver.server --repo "$REPO" "${PORTS[@]}" >"$OUT/tritonserver.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
# Loading fuses the LoRAs and compiles the blocks at the warm-up shape (720p): minutes.
for _ in $(seq 600); do
  curl -sf localhost:8100/v2/health/ready >/dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "tritonserver exited; see $OUT/tritonserver.log"; exit 1; }
  sleep 1
done
for size in "720 1280" "480 832"; do
  read -r height width <<<"$size"
  python benchmarks/e2e_triton.py --url localhost:8101 --height "$height" --width "$width" --num-frames 81 \
    --steps 4 --requests "$REQUESTS" --out "$OUT/distill4_${height}p.json" || status=$?
done
exit $status
