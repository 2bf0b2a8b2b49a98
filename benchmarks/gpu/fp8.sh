#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# `precision: fp8` (wan_triton.kernels.fp8) against bf16 on one Hopper GPU host, one mode per call:
#   bash benchmarks/gpu/fp8.sh tests              the FP8 GPU tests (tests/gpu/test_fp8_gpu.py)
#   bash benchmarks/gpu/fp8.sh kernels [PARTS]    FP8 attention (scale variants) and linear layers against the bf16
#                                                 kernels at 480p and 720p, and one block (benchmarks/fp8_kernels.py)
#   bash benchmarks/gpu/fp8.sh quant              the one-pass activation quantization kernels at every launch
#                                                 (whole row or chunks, warps) against compiled torch ops, 480p and
#                                                 720p (benchmarks/fp8_kernels.py --parts quant --launches ...)
#   bash benchmarks/gpu/fp8.sh tune SIZE [REPEAT]  quant, then step SIZE REPEAT --parts with the sweep's fastest launch
#                                                 per row width beside the served one (FP8_LAUNCHES below)
#   bash benchmarks/gpu/fp8.sh step SIZE [REPEAT] [--parts]
#                                                 the step: diffusers, served bf16 (flash4, or flash3 without it), fp8
#                                                 and fp8 with the attention quantization kernels in one run
#                                                 (benchmarks/denoiser_step.py), expert memory of both;
#                                                 --parts: also fp8 attention alone, then with the linear layers each
#                                                 quantizing its own input (each part's share of the gain)
#   bash benchmarks/gpu/fp8.sh quality [SIZE] [STEPS] [--fp32]
#                                                 a whole run from one seed in bf16 and fp8: final latents, frames PSNR
#                                                 (benchmarks/fp8_quality.py; random weights)
#   bash benchmarks/gpu/fp8.sh e2e ARGS...        end to end through Triton with gpu_a14b_fp8.yaml (benchmarks/gpu/e2e.sh)
#   bash benchmarks/gpu/fp8.sh final              what fits one call of about 9 minutes on an H200: the tests, the
#                                                 attention kernels, the 480p and 720p steps; each part under its own
#                                                 time limit, so a slow part leaves the others' files
# After `source .gpu-bundle/setup.sh` with the FlashAttention-3 add-on (fa3-fwd: FP8 attention needs it) and, for the
# served bf16 baseline, FlashAttention-4 (benchmarks/gpu/common.sh). Results go to $OUT.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
mode=${1:?usage: fp8.sh tests | kernels | quant | tune SIZE [REPEAT] | step SIZE [REPEAT] [--parts] | quality [SIZE] [STEPS] [--fp32] | e2e ARGS... | final}
shift

# Runs "$@" under `timeout $LIMIT` when LIMIT is set (the final mode's parts), else as it is.
limited() {
  if [[ -n ${LIMIT:-} ]]; then timeout "$LIMIT" "$@"; else "$@"; fi
}

served_bf16() {
  if python -c "import flash_attn.cute" 2>/dev/null; then echo flash4+compile; else echo flash3+compile; fi
}

fp8_tests() {
  limited python -m pytest -q -p no:cacheprovider -rs tests/gpu/test_fp8_gpu.py 2>&1 | tee "$OUT/test_fp8.log"
}

fp8_kernels() {
  local parts=("$@")
  ((${#parts[@]})) || parts=(attention linear block)
  limited python benchmarks/fp8_kernels.py --parts "${parts[@]}" --sizes 480p 720p --repeat 3 \
    --out "$OUT/fp8_kernels.json"
}

# CHUNKxWARPS[uUNROLL] (fp8_rows_triton.Launch; chunk 0: the whole row in registers): the whole row at 8 to 32 warps
# a program, chunks of 256 to 4096 columns at 2 to 16 warps, the loop over them at run time or unrolled twice; the
# launches that hold the fewest rows per SM left out (benchmarks/RESULTS.md, Precision: registers and resident rows).
QUANT_LAUNCHES=(0x8 0x16 0x32 256x2 256x4 512x4 512x8 1024x4 1024x8 2048x8 4096x16 1024x8u2)

fp8_quant() {
  limited python benchmarks/fp8_kernels.py --parts quant --sizes 480p 720p --repeat 5 \
    --launches "${QUANT_LAUNCHES[@]}" --out "$OUT/fp8_quant.json"
}

# FP8_LAUNCHES="WIDTH=LAUNCH ..." (e.g. "5120=512x8 13824=512x8"): the step also with the one-pass kernels at these
# launches, after the served fp8 step (denoiser_step.py's fp8-launches variant).
fp8_step() {
  local parts=() launches=()
  [[ ${3:-} == --parts ]] && parts=(fp8-attention+compile fp8-linear+compile)
  if [[ -n ${FP8_LAUNCHES:-} ]]; then
    read -ra launches <<<"$FP8_LAUNCHES"
    launches=(fp8-launches+compile --fp8-launches "${launches[@]}")
  fi
  limited python benchmarks/denoiser_step.py --sizes "$1" --backends "$(served_bf16)" "${parts[@]}" fp8+compile \
    fp8-kernels+compile "${launches[@]}" --repeat "${2:-2}" --out "$OUT/fp8_step_$1.json"
}

# The launch sweep (unless this call's $OUT has it), then the step with its fastest launches beside the served ones.
fp8_tune() {
  [[ -f $OUT/fp8_quant.json ]] || fp8_quant 2>&1 | tee "$OUT/fp8_quant.log"
  local chosen
  chosen=$(python -c 'import json, sys
print(" ".join(f"{w}={l}" for w, l in json.load(open(sys.argv[1]))["quant_choice"].items()))' "$OUT/fp8_quant.json")
  echo "fastest launches: $chosen"
  FP8_LAUNCHES=$chosen fp8_step "$1" "${2:-2}" --parts 2>&1 | tee "$OUT/fp8_step_$1.log"
}

fp8_quality() {
  a14b_checkpoint
  limited python benchmarks/fp8_quality.py --checkpoint /tmp/a14b --size "${1:-480p}" --steps "${2:-40}" "${@:3}" \
    --out "$OUT/fp8_quality_${1:-480p}.json"
}

case $mode in
  tests) fp8_tests ;;
  kernels) fp8_kernels "$@" ;;
  quant) fp8_quant ;;
  tune) fp8_tune "${1:?usage: fp8.sh tune SIZE [REPEAT]}" "${2:-2}" ;;
  step) fp8_step "${1:?usage: fp8.sh step SIZE [REPEAT] [--parts]}" "${2:-2}" "${3:-}" ;;
  quality) fp8_quality "$@" ;;
  e2e) DEPLOYMENT=model_repository/deployments/gpu_a14b_fp8.yaml bash "$(dirname "$0")/e2e.sh" "$@" ;;
  final)
    # Seconds per part on a warm H200, each run alone before the steps had the fp8-kernels variant: tests 60,
    # attention kernels 50, 480p step 90, 720p step (one timed step per variant) 150; the step limits leave room
    # for that variant. The quality run is `fp8.sh quality 480p 40` on its own (about 6 minutes).
    status=0
    LIMIT=90 fp8_tests || status=$?
    LIMIT=60 fp8_kernels attention 2>&1 | tee "$OUT/fp8_kernels.log" || status=$?
    LIMIT=140 fp8_step 480p 2 2>&1 | tee "$OUT/fp8_step_480p.log" || status=$?
    LIMIT=240 fp8_step 720p 1 2>&1 | tee "$OUT/fp8_step_720p.log" || status=$?
    exit $status ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
