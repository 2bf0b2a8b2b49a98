#!/usr/bin/env bash
# Packs the offline bundle for a GPU host that cannot reach a package registry (docs/gpu-hosts.md): what such a host
# lacks to build, serve, test and benchmark this project, for its Python (GPU_PYTHON, default 3.12) on x86-64 Linux.
# The host brings PyTorch (a CUDA build), transformers and their usual dependencies.
#   OUT/      about 44 MB: setup.sh and install.sh (run on the host), MANIFEST, tritonserver 2.51 with its Python
#             backend (from the nvidia-pytriton 0.7.0 wheel, stripped to the server, the stub for GPU_PYTHON and the
#             libraries they load), and the Python packages with perf_analyzer (piece "site")
#   OUT-av/   about 24 MB: PyAV (piece "av"). A folder of its own because OUT, PyAV and the repository together pass
#             the 64 MiB that one copy to the host may carry.
# Usage, from the project root, where pip reaches PyPI (OUT must be git-ignored; default .gpu-bundle):
#     make gpu-bundle                       or      bash tools/gpu_bundle/pack.sh [OUT]
# Needs pip, unzip, xz, tar, split and sha256sum; about 5 minutes on 2 cores, most of it xz. The archives are packed
# again only when the pins, the Python or this script change (FORCE=1 packs them anyway); setup.sh and install.sh
# are copied every time. Kernel add-ons: pack_kernel.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/lib.sh"
OUT=${1:-.gpu-bundle}
need_tools unzip xz tar split sha256sum

# What the host lacks, pinned to the versions CI installs from pyproject.toml, so that the host runs what the tests
# ran. Dependencies the host already has (torch, transformers, accelerate, safetensors, sentencepiece, pyyaml,
# grpcio, huggingface-hub, Pillow, ...) are not carried; install.sh checks that they import.
SITE_PINS=(
  numpy==1.26.4                       # Triton's Python-backend stub returns empty tensors with numpy 2
  tritonclient==2.51.0                # the server's version; its wheel carries perf_analyzer 2.51
  python-rapidjson==1.25              # tritonclient's JSON
  protobuf==4.25.9                    # tritonclient 2.51's generated gRPC code asks for protobuf<5
  diffusers==0.42.1                   # the reference the outputs are checked against
  ftfy==6.3.1 wcwidth==0.9.4          # the prompt cleaning (diffusers' prompt_clean) uses ftfy when installed
  pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
  typing-extensions==4.16.0           # pydantic 2.14 needs 4.16
  pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 packaging==26.4
  nvidia-cuda-runtime-cu12==12.9.79   # libcudart.so.12 for perf_analyzer (a CUDA 13 host has only libcudart.so.13)
  pip==26.3 setuptools==84.2.1        # the project's editable install on the host, offline: no build isolation
)
AV_PINS=(av==18.1.0)
TRITON_PIN=nvidia-pytriton==0.7.0

recipe=$( (echo "python=$GPU_PYTHON ${SITE_PINS[*]} ${AV_PINS[*]} $TRITON_PIN"; cat "$HERE"/{lib,pack}.sh) |
  sha256sum | cut -c1-16)
# The scripts' hash is part of MANIFEST, whose hash names the bundle on the host: new scripts install it again there.
scripts=$(cat "$HERE"/{setup,install}.sh | sha256sum | cut -c1-16)
if [[ ${FORCE:-0} != 1 && -f $OUT/MANIFEST && -f $OUT-av/av.manifest ]] && grep -qx "recipe=$recipe" "$OUT/MANIFEST"; then
  cp "$HERE/setup.sh" "$HERE/install.sh" "$OUT/"
  if ! grep -qx "scripts=$scripts" "$OUT/MANIFEST"; then
    sed -i '/^scripts=/d' "$OUT/MANIFEST"
    echo "scripts=$scripts" >> "$OUT/MANIFEST"
  fi
  echo "gpu-bundle: the archives in $OUT are up to date (FORCE=1 packs them again); scripts copied"
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"
rm -f "$OUT/MANIFEST"  # written last: a MANIFEST means a complete bundle

echo "gpu-bundle: downloading wheels for Python $GPU_PYTHON"
download "$TMP/wheels-triton" "$TRITON_PIN"
download "$TMP/wheels-site" "${SITE_PINS[@]}"
download "$TMP/wheels-av" "${AV_PINS[@]}"

# 1. tritonserver and its Python backend, from the nvidia-pytriton wheel: the server, the backend, the stub for the
#    host's Python, the response cache and the libraries they load (the rest of the wheel is pytriton's own Python).
tree=$TMP/tritonserver
mkdir -p "$tree"
unzip -q "$TMP"/wheels-triton/nvidia_pytriton-*.whl 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' -d "$tree"
ts=$tree/pytriton/tritonserver
stub=$ts/python_backend_stubs/$GPU_PYTHON/triton_python_backend_stub
if [[ ! -f $stub ]]; then
  echo "gpu-bundle: $TRITON_PIN has no Python backend stub for Python $GPU_PYTHON" >&2
  exit 1
fi
# Triton runs the stub found beside libtriton_python.so; backends/python is as deep as python_backend_stubs/X.Y, so
# the stub's relative RPATH still reaches nvidia_pytriton.libs.
mv "$stub" "$ts/backends/python/"
rm -rf "$ts/python_backend_stubs"
# The wheel's own libpython (31 MB) is the one its Python 3.13 stub links; other stubs load the host's libpython.
if ! grep -q -a 'libpython3-' "$ts/backends/python/triton_python_backend_stub"; then
  rm -f "$tree"/nvidia_pytriton.libs/libpython3-*
fi
(tar -C "$tree" --sort=name --owner=0 --group=0 --numeric-owner -cf - pytriton nvidia_pytriton.libs |
  xz -9 -T0 > "$TMP/tritonserver.tar.xz") &
triton_job=$!

# 2. The Python packages, laid out as in the host's virtual environment.
tree=$TMP/site
install_tree "$tree" "$TMP"/wheels-site/*.whl
site=$tree/$SITE_DIR
find "$site/numpy" -type d -name tests -prune -exec rm -rf {} +
# Only libcudart.so.12 is used. nvidia/ stays a namespace package (no __init__.py), or it would hide the host's
# nvidia.* packages (cuDNN, NCCL, ...), whose libraries torch loads.
rm -rf "$site/nvidia/cuda_runtime/include" "$site"/nvidia/cuda_runtime/lib/*.a "$site/nvidia/__init__.py"
# perf_client is a second copy of perf_analyzer. perf_analyzer itself moves to libexec/: install.sh puts a wrapper
# in bin/ that finds its two libraries (libb64 from the Triton libraries, libcudart.so.12 from above).
rm -f "$tree/bin/perf_client" "$tree"/bin/pip3.*
sed -i '/bin\/perf_client,/d' "$site"/tritonclient-*.dist-info/RECORD
mkdir -p "$tree/libexec"
mv "$tree/bin/perf_analyzer" "$tree/libexec/perf_analyzer"
wheels_list "$TMP/wheels-site" > "$TMP/site.wheels"
(write_piece site "$tree" "$OUT" "Python packages the host lacks, perf_analyzer" "$TMP/site.wheels") &
site_job=$!

# 3. PyAV (MP4 encoding), its own piece and folder: 24 MB of FFmpeg libraries.
tree=$TMP/av
install_tree "$tree" "$TMP"/wheels-av/*.whl
wheels_list "$TMP/wheels-av" > "$TMP/av.wheels"
(write_piece av "$tree" "$OUT-av" "PyAV: MP4 encoding of the served videos" "$TMP/av.wheels") &
av_job=$!

echo "gpu-bundle: compressing (xz -9)"
wait "$triton_job"
wait "$site_job"
wait "$av_job"
mv "$TMP/tritonserver.tar.xz" "$OUT/"
cp "$HERE/setup.sh" "$HERE/install.sh" "$OUT/"

{
  echo "bundle=wan-triton GPU host bundle"
  echo "python=$GPU_PYTHON"
  echo "recipe=$recipe"
  echo "scripts=$scripts"
  echo "packed=$(date -u +%Y-%m-%dT%H:%M:%SZ) from commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "required=site av"
  echo "tritonserver=$(basename "$TMP"/wheels-triton/*.whl) (tritonserver 2.51, Python backend stub for $GPU_PYTHON)"
  echo "tritonserver_sha256=$(sha256sum "$OUT/tritonserver.tar.xz" | cut -d' ' -f1)"
} > "$OUT/MANIFEST"
du -b "$OUT"/* "$OUT"-av/* | awk '{printf "%8.1f MB  %s\n", $1 / 1e6, $2}'
du -cb "$OUT" "$OUT"-av | tail -1 | awk '{printf "%8.1f MB  in all\n", $1 / 1e6}'
