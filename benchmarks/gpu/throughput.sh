#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Throughput through Triton on one GPU at several client concurrencies, for ONE batching setting per invocation:
# the configs-only A14B checkpoint (random bf16 weights built on the device), a copy of gpu_a14b.yaml with
# `serving.max_batch_size` set to $MAX_BATCH and the warm-up at 480p (so that startup is shorter), then
# benchmarks/throughput.py on it (480p, 81 frames, 2 steps unless the arguments say otherwise; warm-up, the
# concurrency sweep, JSON after every level), which gets this script's arguments:
#   MAX_BATCH=1 bash benchmarks/gpu/throughput.sh --concurrency 1 2 4 8
# DETACH=1: the server runs in its own session (ports 8000-8002) and outlives the invocation, so that later
# invocations on the same host measure more levels on it without loading the model again (minutes for A14B).
# Starting a server for another MAX_BATCH first stops the one this script started before (one A14B pipeline fills
# the GPU). Levels that would end after DEADLINE (epoch seconds; default: TIME_LIMIT_S, 540, after this script starts)
# are skipped and marked so in the JSON; PART names the result file's part (throughput_b<MAX_BATCH>_<PART>.json).
# After `source .gpu-bundle/setup.sh` with the FlashAttention-4 add-on (benchmarks/gpu/common.sh). Results go to
# $OUT.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
MAX_BATCH=${MAX_BATCH:-1}
DEADLINE=${DEADLINE:-$(($(date +%s) + ${TIME_LIMIT_S:-540}))}
PART=${PART:-}
REPO=/tmp/repo_b$MAX_BATCH
PIDFILE=/tmp/tritonserver_b$MAX_BATCH.pid
SERVER_LOG=/tmp/tritonserver_b$MAX_BATCH.log
running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! { [[ ${DETACH:-0} == 1 ]] && running "$PIDFILE"; }; then
  python -m wan_bench.deployments --deployment model_repository/deployments/gpu_a14b.yaml \
    --max-batch-size "$MAX_BATCH" --warmup 480x832x81 --out "/tmp/deployment_b$MAX_BATCH.json"
  render_repo "/tmp/deployment_b$MAX_BATCH.json" "$REPO"
  cp "/tmp/deployment_b$MAX_BATCH.json" "$OUT/"
fi
echo "setup took $SECONDS s"
ARGS=(--max-batch-size "$MAX_BATCH" --height 480 --width 832 --num-frames 81 --steps 2
  --out "$OUT/throughput_b$MAX_BATCH${PART:+_$PART}.json")

if [[ ${DETACH:-0} == 1 ]]; then
  if running "$PIDFILE"; then
    echo "reusing the server of max_batch_size $MAX_BATCH (pid $(cat "$PIDFILE"))"
  else
    for other in /tmp/tritonserver_b*.pid; do
      [[ -e $other ]] || continue
      if running "$other"; then
        echo "stopping the server of $other"
        kill -TERM -- "-$(cat "$other")" || true
        for _ in $(seq 120); do kill -0 -- "-$(cat "$other")" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$(cat "$other")" 2>/dev/null || true
      fi
      rm -f "$other"
    done
    date +%s > "/tmp/tritonserver_b$MAX_BATCH.started"
    setsid python -m wan_triton.tritonserver.server --repo "$REPO" --http-port 8000 --grpc-port 8001 \
      --metrics-port 8002 > "$SERVER_LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    echo "started the server of max_batch_size $MAX_BATCH (pid $!)"
  fi
  trap 'cp "$SERVER_LOG" "$OUT/" || true' EXIT
  python benchmarks/throughput.py --url localhost:8001 --http-port 8000 --metrics-port 8002 --log "$SERVER_LOG" \
    --server-started-epoch "$(cat "/tmp/tritonserver_b$MAX_BATCH.started")" --time-limit-s $((DEADLINE - $(date +%s))) \
    "${ARGS[@]}" "$@"
else
  python benchmarks/throughput.py --repo "$REPO" --log "$OUT/tritonserver_b$MAX_BATCH.log" \
    --time-limit-s $((DEADLINE - $(date +%s))) "${ARGS[@]}" "$@"
fi
