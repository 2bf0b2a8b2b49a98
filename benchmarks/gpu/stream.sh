#!/usr/bin/env bash
# The streaming endpoint on one GPU: the configs-only A14B checkpoint (random bf16 weights built on the device),
# gpu_a14b.yaml with its warm-up at 480p, then benchmarks/stream_overhead.py (the same 480p request through the
# unary ensemble and the streaming endpoint, alternated; same frames required).
# Run on the GPU host after `source .gpukit/setup.sh` (+ the FlashAttention-4 add-on), with the wheels the kit
# lacks (pydantic and its deps, av) in $WHEELS; `COMMIT=<sha>` names the commit. Arguments go to stream_overhead.py.
#   COMMIT=abc1234 bash benchmarks/gpu_stream.sh --steps 4 --preview 2 --pairs 2
set -euo pipefail
WHEELS=${WHEELS:-/tmp/whl}  # pydantic and its deps, av
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
# The build runs with the host's numpy 2 first (its scipy needs it); the kit's numpy 1.26 is for Triton's stub.
HOST_SITE=$(ls -d /opt/torch/.venv/lib/python3*/site-packages 2>/dev/null | head -1)
[[ -f /tmp/a14b/model_index.json ]] || PYTHONPATH=$HOST_SITE python3 -m wan_build.shapes_checkpoint /tmp/a14b
PYTHONPATH=$HOST_SITE python3 - <<'PY'
from pathlib import Path

from wan_triton.config.deployment import Deployment, WarmupShape

deployment = Deployment.load("model_repository/deployments/gpu_a14b.yaml")
deployment = deployment.model_copy(update={"warmup": [WarmupShape(height=480, width=832, num_frames=81)]})
Path("/tmp/deployment_stream.json").write_text(deployment.to_json())
PY
rm -rf /tmp/repo_stream
PYTHONPATH=$HOST_SITE python3 -m wan_build --model /tmp/a14b --deployment /tmp/deployment_stream.json \
  --repo /tmp/repo_stream
DEVICE=${DEVICE:-$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)}
export DEVICE
echo "device: $DEVICE; setup took $SECONDS s"
status=0
python3 benchmarks/stream_overhead.py --repo /tmp/repo_stream --height 480 --width 832 --num-frames 81 \
  --log "$OUT/tritonserver_stream.log" --out "$OUT/stream_overhead_480p.json" "$@" || status=$?
exit $status
