#!/usr/bin/env bash
# Packs the optional FlashAttention-3 add-on for the GPU host (attention backend `flash3`): the fa3-fwd 0.0.3
# wheel (FlashAttention-3's Hopper forward kernels, built against PyTorch's stable C ABI and CUDA 13, so it loads in
# the host's torch 2.11+cu130), recompressed with xz: 27.6 MB as a wheel, about 9.3 MB as .gpukit-fa3/fa3.tar.xz.
# Usage, from the project root where pip works (the folder is git-ignored):
#     bash benchmarks/pack_fa3.sh
# On the GPU host the archive travels in a call of its own (the kit and the FlashAttention-4 add-on fill a transfer):
# a call carrying .gpukit-fa3 runs `mkdir -p /tmp/gpukit-fa3 && cp .gpukit-fa3/fa3.tar.xz /tmp/gpukit-fa3/`; later
# calls on that warm host `source benchmarks/setup_fa3.sh` after `source .gpukit/setup.sh`.
set -euo pipefail
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d "$TMP" fa3-fwd==0.0.3
mkdir "$TMP/site"
(cd "$TMP/site" && unzip -q "$TMP"/fa3_fwd-0.0.3-*.whl)
mkdir -p .gpukit-fa3
tar -C "$TMP/site" -cf - . | xz -T0 -9 > .gpukit-fa3/fa3.tar.xz
du -sh .gpukit-fa3/fa3.tar.xz
