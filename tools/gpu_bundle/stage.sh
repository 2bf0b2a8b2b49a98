#!/usr/bin/env bash
# For a host reached through copies of limited size (64 MiB with the repository): keeps the bundle folders that this
# copy carried in $WAN_GPU_HOME/staged (default /tmp/wan-gpu/staged), where a later `source .gpu-bundle/setup.sh` on
# the same host finds them. Run from the project root, in the command that carries them:
#     bash tools/gpu_bundle/stage.sh            stages every .gpu-bundle-*/ folder here (PyAV, kernel add-on parts)
# The base folder (.gpu-bundle/) is not staged: setup.sh comes with it, and after its first run later commands can
# source $WAN_GPU_HOME/setup.sh instead.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STAGED=${WAN_GPU_HOME:-/tmp/wan-gpu}/staged
mkdir -p "$STAGED"
staged=0
for folder in "$ROOT"/.gpu-bundle-*/; do
  for file in "$folder"*.manifest "$folder"*.tar.xz.part*; do
    if [[ -f $file ]]; then
      cp "$file" "$STAGED/"
      echo "staged $(basename "$file") ($(du -h "$file" | cut -f1)) from $(basename "$folder")"
      staged=$((staged + 1))
    fi
  done
done
if ((staged == 0)); then
  echo "stage: no .gpu-bundle-*/ folder with parts in $ROOT" >&2
  exit 1
fi
