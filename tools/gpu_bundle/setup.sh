# Source on the GPU host, from the project root:      source .gpu-bundle/setup.sh
# (later commands on the same host, without copying the bundle again:   source /tmp/wan-gpu/setup.sh)
# install.sh unpacks the bundle into $WAN_GPU_HOME (default /tmp/wan-gpu) the first time, and afterwards only what
# changed (a kernel add-on that arrived, the project checkout); then this exports:
#   TRITONSERVER, TRITON_BACKEND_DIR, TRITON_CACHE_DIR
#                     the bundle's tritonserver, its backends and response-cache folders (wan_triton's server
#                     launcher reads them)
#   PATH              the bundle's virtual environment first: Triton's Python-backend stub ignores PYTHONPATH and
#                     takes its site-packages from the first python3 on PATH
#   LD_LIBRARY_PATH   with $WAN_GPU_HOME/lib first (libb64.so.0d, which perf_analyzer links)
#   HOST_SITE         the host's own site-packages (torch's). Put it first, PYTHONPATH=$HOST_SITE, for steps that
#                     import the host's scipy, which is built for the host's numpy 2 (wan_build, in-process
#                     benchmarks); the server and its stub keep the bundle's numpy 1.26
#   NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
#                     NVLink multicast stays off in NCCL, PyTorch and NVSHMEM: on a shared multi-GPU host a
#                     multicast object can leave the GPUs unusable, and nothing here needs it
# This file is sourced, so it leaves the caller's shell options alone and returns (never exits) on failure; the work,
# under `set -euo pipefail`, is in install.sh.

if ! (return 0 2>/dev/null); then
  echo "gpu-bundle: source this file (source ${BASH_SOURCE[0]}); run as a script it cannot export anything" >&2
  exit 2
fi

export WAN_GPU_HOME=${WAN_GPU_HOME:-/tmp/wan-gpu}
if ! bash "$(dirname "${BASH_SOURCE[0]}")/install.sh"; then
  echo "gpu-bundle: setup failed (above); nothing was exported" >&2
  return 1
fi

HOST_SITE=$(head -1 "$WAN_GPU_HOME/host-site")
export HOST_SITE
export TRITONSERVER=$WAN_GPU_HOME/tritonserver/pytriton/tritonserver/bin/tritonserver
export TRITON_BACKEND_DIR=$WAN_GPU_HOME/tritonserver/pytriton/tritonserver/backends
export TRITON_CACHE_DIR=$WAN_GPU_HOME/tritonserver/pytriton/tritonserver/caches
# First, and once, however often this is sourced in one shell.
_wan_path=":${PATH:-}:"
_wan_path=${_wan_path//":$WAN_GPU_HOME/venv/bin:"/:}
_wan_path=${_wan_path#:}
_wan_path=${_wan_path%:}
export PATH=$WAN_GPU_HOME/venv/bin${_wan_path:+:$_wan_path}
_wan_path=":${LD_LIBRARY_PATH:-}:"
_wan_path=${_wan_path//":$WAN_GPU_HOME/lib:"/:}
_wan_path=${_wan_path#:}
_wan_path=${_wan_path%:}
export LD_LIBRARY_PATH=$WAN_GPU_HOME/lib${_wan_path:+:$_wan_path}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset _wan_path
