#!/usr/bin/env bash
# End to end through Triton: the configs-only A14B checkpoint (random bf16 weights built on the device), a GPU
# deployment ($DEPLOYMENT, default gpu_a14b.yaml on one GPU; gpu_a14b_cfg2.yaml for two), requests through the gRPC
# client, and Triton's per-model statistics for the breakdown.
# Run on the GPU host after `source .gpukit/setup.sh` (+ the FlashAttention-4 add-on), with the wheels the kit lacks
# (pydantic and its deps, av) in $WHEELS. Arguments are passed to benchmarks/e2e_triton.py.
set -euo pipefail
WHEELS=${WHEELS:-/tmp/whl}  # pydantic and its deps, av
OUT=${OUT:-out}
DEPLOYMENT=${DEPLOYMENT:-model_repository/deployments/gpu_a14b.yaml}
python3 -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
# The build runs with the host's numpy 2 first (its scipy needs it); the kit's numpy 1.26 is for Triton's stub.
HOST_SITE=$(ls -d /opt/torch/.venv/lib/python3*/site-packages 2>/dev/null | head -1)
PYTHONPATH=$HOST_SITE python3 -m wan_build.shapes_checkpoint /tmp/a14b
PYTHONPATH=$HOST_SITE python3 -m wan_build --model /tmp/a14b --deployment "$DEPLOYMENT" \
  --repo /tmp/repo
# What the stub will import, checked first with the stub's environment (the kit venv, numpy 1.26).
python3 -c "import wan_triton.serving.models; from transformers import AutoTokenizer, UMT5EncoderModel"
status=0
python3 benchmarks/e2e_triton.py --repo /tmp/repo --out "$OUT/e2e.json" "$@" || status=$?
cp /tmp/tritonserver.log "$OUT/tritonserver.log"
exit $status
