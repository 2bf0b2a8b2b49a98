# shellcheck shell=bash
# Sourced by the GPU-host drivers (benchmarks/gpu/*.sh). Precondition, on the GPU host from the project root:
#     source .gpu-bundle/setup.sh
# the project's offline bundle: its venv first on PATH with the project installed (pip -e) and what the benchmarks
# and tests need, the Triton server (TRITONSERVER, TRITON_BACKEND_DIR) and the NCCL settings; the optional
# attention kernels (FlashAttention-4, FlashAttention-3) are add-ons installed into the same venv.
# This file checks the bundle was sourced, moves to the project root, sets OUT (results; default out/) and defines
# the helpers the drivers share. The result records name the commit themselves (`$COMMIT` where the host has no
# .git) and the device.
: "${TRITONSERVER:?source .gpu-bundle/setup.sh first (the offline bundle for GPU hosts)}"
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || return
OUT=${OUT:-out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
# The host's own site-packages first for everything these drivers run in Python: its scipy (which diffusers imports)
# is built for its numpy 2, while the bundle's numpy 1.26 is for Triton's Python backend stub, which ignores
# PYTHONPATH and so still takes the bundle's venv first (docs/gpu-hosts.md).
export PYTHONPATH=${HOST_SITE:?source .gpu-bundle/setup.sh first}${PYTHONPATH:+:$PYTHONPATH}

# The GPU test files, run by `attention.sh check` and `runtime.sh tests`.
GPU_TESTS=(tests/gpu tests/unit/test_attention.py)

# The GPU tests, their log in $OUT/test_gpu.log.
run_gpu_tests() {
  python -m pytest -q -p no:cacheprovider -rs "${GPU_TESTS[@]}" 2>&1 | tee "$OUT/test_gpu.log"
}

# The configs-only A14B checkpoint in /tmp/a14b (random bf16 weights built on the device at load), once per host.
a14b_checkpoint() {
  [[ -f /tmp/a14b/model_index.json ]] || python -m wan_build.shapes_checkpoint /tmp/a14b
}

# render_repo DEPLOYMENT REPO: `make build` of the A14B checkpoint with DEPLOYMENT into REPO (replaced), then a check
# that what Triton's Python backend stub will import imports in this environment.
render_repo() {
  a14b_checkpoint
  rm -rf "$2"
  python -m wan_build --model /tmp/a14b --deployment "$1" --repo "$2"
  python -c "import wan_triton.serving.models; from transformers import AutoTokenizer, UMT5EncoderModel"
}
