#!/usr/bin/env bash
# Packs an optional attention-kernel add-on for the GPU-host bundle (pack.sh), for a host whose torch is a CUDA 13
# build (2.11+cu130 on the known host). setup.sh installs an add-on into the bundle's environment once all its parts
# are on the host, so plain python3 and Triton's Python-backend stub both see it (attention backends flash4, flash3).
#   flash4   FlashAttention-4 (CuTe DSL): flash-attn-4 4.0.0b36, the NVIDIA CUTLASS Python DSL 4.8.1 with its CUDA 13
#            libraries, quack-kernels and their small dependencies. About 71 MB: the DSL's compiler library alone is
#            about 64 MB compressed, so it comes in two parts, OUT-flash4-1/ (55 MiB) and OUT-flash4-2/ (the rest).
#            The first call of each shape compiles for a few seconds.
#   flash3   FlashAttention-3's Hopper forward (fa3-fwd 0.0.3), built against PyTorch's stable C ABI and CUDA 13, so it
#            loads in torch 2.11+cu130. About 9 MB, OUT-flash3/.
# Usage, from the project root where pip reaches PyPI (default OUT: .gpu-bundle; the folders are git-ignored):
#     make gpu-bundle KERNELS="flash4 flash3"          or      bash tools/gpu_bundle/pack_kernel.sh NAME [OUT]
# The host's torch, einops, packaging, ninja and cuda-bindings are used as they are; typing-extensions and protobuf
# come from the bundle's own packages.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/lib.sh"
NAME=${1:?usage: pack_kernel.sh flash4|flash3 [OUT]}
OUT=${2:-.gpu-bundle}
need_tools xz tar split sha256sum

case $NAME in
  flash4)
    description="FlashAttention-4 (CuTe DSL, CUDA 13 libraries): attention backend flash4"
    # nvidia-cutlass-dsl asks for the CUDA 12 libraries unless its cu13 extra is chosen; the cu13 ones match the
    # host's CUDA 13 torch.
    PINS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5
      apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5) ;;
  flash3)
    description="FlashAttention-3 Hopper forward (fa3-fwd, CUDA 13, stable ABI): attention backend flash3"
    PINS=(fa3-fwd==0.0.3) ;;
  *)
    echo "pack_kernel: unknown kernel add-on $NAME (flash4 or flash3)" >&2
    exit 2 ;;
esac
if [[ -f $OUT/MANIFEST && $(sed -n 's/^python=//p' "$OUT/MANIFEST") != "$GPU_PYTHON" ]]; then
  echo "pack_kernel: $OUT is packed for another Python than $GPU_PYTHON (GPU_PYTHON)" >&2
  exit 1
fi

recipe=$( (echo "python=$GPU_PYTHON ${PINS[*]}"; cat "$HERE"/{lib,pack_kernel}.sh) | sha256sum | cut -c1-16)
manifest=$OUT-$NAME/$NAME.manifest
[[ -f $manifest ]] || manifest=$OUT-$NAME-1/$NAME.manifest
if [[ ${FORCE:-0} != 1 && -f $manifest ]] && grep -qx "recipe=$recipe" "$manifest"; then
  echo "gpu-bundle: $NAME add-on is up to date (FORCE=1 packs it again)"
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "gpu-bundle: $NAME add-on for Python $GPU_PYTHON"
download "$TMP/wheels" "${PINS[@]}"
install_tree "$TMP/tree" "$TMP"/wheels/*.whl
{
  echo "recipe=$recipe"
  wheels_list "$TMP/wheels"
} > "$TMP/wheels.txt"
write_piece "$NAME" "$TMP/tree" "$OUT-$NAME" "$description" "$TMP/wheels.txt"
du -b "$OUT-$NAME"*/* | awk '{printf "%8.1f MB  %s\n", $1 / 1e6, $2}'
