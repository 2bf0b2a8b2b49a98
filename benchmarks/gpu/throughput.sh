#!/usr/bin/env bash
# Throughput through Triton on one GPU at several client concurrencies, for ONE batching setting per invocation:
# the configs-only A14B checkpoint (random bf16 weights built on the device), a copy of gpu_a14b.yaml with
# `serving.max_batch_size` set to $MAX_BATCH and the warm-up at 480p (so that startup is shorter), then
# benchmarks/gpu_throughput.py (warm-up, the concurrency sweep, JSON after every level).
# Run on the GPU host after `source .gpukit/setup.sh` (+ the FlashAttention-4 add-on), with the wheels the kit
# lacks (pydantic and its deps, av) in $WHEELS; `COMMIT=<sha>` names the commit. Arguments go to gpu_throughput.py.
#   MAX_BATCH=1 COMMIT=abc1234 bash benchmarks/gpu_throughput.sh --steps 2 --concurrency 1 2 4 8
# DETACH=1: the server runs in its own session (ports 8000-8002) and outlives the invocation, so that later
# invocations on the same host (the GPU host's calls are limited to 10 minutes; loading the A14B server takes about
# 5) measure more levels on it without loading again. Starting a server for another MAX_BATCH first stops the one
# this script started before (one A14B pipeline fills the GPU). Levels that would end after DEADLINE (epoch
# seconds; default: BUDGET_S after this script starts) are skipped and marked so in the JSON.
set -euo pipefail
WHEELS=${WHEELS:-/tmp/whl}  # pydantic and its deps, av
OUT=${OUT:-out}
MAX_BATCH=${MAX_BATCH:-1}
DEADLINE=${DEADLINE:-$(($(date +%s) + ${BUDGET_S:-540}))}
PART=${PART:-}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
# The build runs with the host's numpy 2 first (its scipy needs it); the kit's numpy 1.26 is for Triton's stub.
HOST_SITE=$(ls -d /opt/torch/.venv/lib/python3*/site-packages 2>/dev/null | head -1)
[[ -f /tmp/a14b/model_index.json ]] || PYTHONPATH=$HOST_SITE python3 -m wan_build.shapes_checkpoint /tmp/a14b
REPO=/tmp/repo_b$MAX_BATCH
PIDFILE=/tmp/tritonserver_b$MAX_BATCH.pid
SERVER_LOG=/tmp/tritonserver_b$MAX_BATCH.log
running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! { [[ ${DETACH:-0} == 1 ]] && running "$PIDFILE"; }; then
  PYTHONPATH=$HOST_SITE MAX_BATCH=$MAX_BATCH python3 - <<'PY'
import os
from pathlib import Path

from wan_triton.config.deployment import Deployment, WarmupShape

deployment = Deployment.load("model_repository/deployments/gpu_a14b.yaml")
serving = deployment.serving.model_copy(update={"max_batch_size": int(os.environ["MAX_BATCH"])})
warmup = [WarmupShape(height=480, width=832, num_frames=81)]
deployment = deployment.model_copy(update={"serving": serving, "warmup": warmup})
Path(f"/tmp/deployment_b{os.environ['MAX_BATCH']}.json").write_text(deployment.to_json())
print(deployment.serving, deployment.warmup)
PY
  rm -rf "$REPO"
  PYTHONPATH=$HOST_SITE python3 -m wan_build --model /tmp/a14b --deployment "/tmp/deployment_b$MAX_BATCH.json" \
    --repo "$REPO"
  cp "/tmp/deployment_b$MAX_BATCH.json" "$OUT/"
  python3 -c "import wan_triton.serving.models; from transformers import AutoTokenizer, UMT5EncoderModel"
fi
DEVICE=${DEVICE:-$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)}
export DEVICE
echo "device: $DEVICE; setup took $SECONDS s"
ARGS=(--max-batch-size "$MAX_BATCH" --out "$OUT/throughput_b$MAX_BATCH${PART:+_$PART}.json")

if [[ ${DETACH:-0} == 1 ]]; then
  if running "$PIDFILE"; then
    echo "reusing the server of max_batch_size $MAX_BATCH (pid $(cat "$PIDFILE"))"
  else
    for other in /tmp/tritonserver_b*.pid; do
      if running "$other"; then
        echo "stopping the server of $other"
        kill -TERM -- "-$(cat "$other")" || true
        for _ in $(seq 120); do kill -0 -- "-$(cat "$other")" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$(cat "$other")" 2>/dev/null || true
      fi
      rm -f "$other"
    done
    date +%s > "/tmp/tritonserver_b$MAX_BATCH.started"
    setsid python3 -m wan_triton.tritonserver.server --repo "$REPO" --http-port 8000 --grpc-port 8001 --metrics-port 8002 \
      > "$SERVER_LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    echo "started the server of max_batch_size $MAX_BATCH (pid $!)"
  fi
  trap 'cp "$SERVER_LOG" "$OUT/" || true' EXIT
  python3 benchmarks/gpu_throughput.py --url localhost:8001 --http-port 8000 --metrics-port 8002 --log "$SERVER_LOG" \
    --server-started-epoch "$(cat "/tmp/tritonserver_b$MAX_BATCH.started")" --budget-s $((DEADLINE - $(date +%s))) \
    "${ARGS[@]}" "$@"
else
  python3 benchmarks/gpu_throughput.py --repo "$REPO" --log "$OUT/tritonserver_b$MAX_BATCH.log" \
    --budget-s $((DEADLINE - $(date +%s))) "${ARGS[@]}" "$@"
fi
