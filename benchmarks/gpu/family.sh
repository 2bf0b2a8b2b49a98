#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The Wan2.2 family beyond T2V-A14B on one GPU, from configs-only checkpoints (random bf16 weights built on the
# device; python -m wan_build.shapes_checkpoint --kind i2v|ti2v), sized for about 8 minutes on one H200 (one timed
# I2V step after its warm-up, two TI2V steps, one timed end-to-end request of $STEPS steps per mode):
#   1. the I2V-A14B 720p step (1280x720, 81 frames), ours vs diffusers' WanImageToVideoPipeline transformer step;
#   2. the TI2V-5B step at 704x1280, 121 frames, ours vs diffusers' WanPipeline (expand_timesteps) transformer step;
#   3. TI2V-5B end to end through Triton with gpu_ti2v_5b.yaml, text-to-video and then image-to-video (a synthetic
#      PNG: the VAE encode runs too): the per-stage breakdown and each model's peak device memory
#      (benchmarks/e2e_triton.py), $STEPS steps (default 4), one timed request each.
#   bash benchmarks/gpu/family.sh [steps|e2e|all]
# `steps` runs 1 and 2 (about 4 minutes), `e2e` runs 3 (about 4), `all` (the default) both.
# After `source .gpu-bundle/setup.sh` (benchmarks/gpu/common.sh). Results and the server log go to $OUT.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
STEPS=${STEPS:-4}
PART=${1:-all}
case "$PART" in steps | e2e | all) ;; *) echo "usage: $0 [steps|e2e|all]" >&2; exit 2 ;; esac

# shapes_checkpoint KIND DIR: the configs-only checkpoint of that kind, once per host.
shapes_checkpoint() {
  [[ -f $2/model_index.json ]] || python -m wan_build.shapes_checkpoint "$2" --kind "$1"
}
status=0
shapes_checkpoint ti2v /tmp/ti2v_5b
if [[ $PART != e2e ]]; then
  shapes_checkpoint i2v /tmp/i2v_a14b
  python benchmarks/family_step.py --checkpoint /tmp/i2v_a14b --height 720 --width 1280 --num-frames 81 --compile \
    --repeat 1 --out "$OUT/family_step_i2v_a14b_720p.json" 2>&1 | tee "$OUT/family_step_i2v_a14b_720p.log" || status=$?
  python benchmarks/family_step.py --checkpoint /tmp/ti2v_5b --height 704 --width 1280 --num-frames 121 --compile \
    --out "$OUT/family_step_ti2v_5b.json" 2>&1 | tee "$OUT/family_step_ti2v_5b.log" || status=$?
  [[ $PART == steps ]] && exit $status
fi

rm -rf /tmp/repo_ti2v
python -m wan_build --model /tmp/ti2v_5b --deployment model_repository/deployments/gpu_ti2v_5b.yaml --repo /tmp/repo_ti2v
python -c "import wan_triton.serving.models; from transformers import AutoTokenizer, UMT5EncoderModel"
# The conditioning image of the image-to-video request: a smooth synthetic picture at the request's size.
python - <<'EOF'
import numpy as np
from PIL import Image

y, x = np.mgrid[0:704, 0:1280]
rgb = np.stack([x * 255 // 1279, y * 255 // 703, (x + y) * 255 // 1982], -1).astype(np.uint8)
Image.fromarray(rgb).save("/tmp/ti2v_image.png")
EOF
for mode in t2v i2v; do
  image=()
  [[ $mode == i2v ]] && image=(--image /tmp/ti2v_image.png)
  python benchmarks/e2e_triton.py --repo /tmp/repo_ti2v --model wan_ti2v --height 704 --width 1280 --num-frames 121 \
    --steps "$STEPS" "${image[@]}" --requests 1 --warmup 1 --out "$OUT/e2e_ti2v_5b_$mode.json" || status=$?
  cp /tmp/tritonserver.log "$OUT/tritonserver_ti2v_$mode.log" || true
done
exit $status
