# Source on the GPU host after `source .gpukit/setup.sh`, from the project root: installs the FlashAttention-3
# add-on (benchmarks/pack_fa3.sh) into the kit's venv, so plain python3 and Triton's Python backend both see it.
# The archive is taken from .gpukit-fa3/ when this call carries it, else from /tmp/gpukit-fa3/ (copied there by an
# earlier call on the same warm host). The extension links torch's libraries, so torch is imported first.
if ! python3 -c 'import torch, fa3_fwd._C' 2>/dev/null; then
  _fa3=.gpukit-fa3/fa3.tar.xz
  [[ -f $_fa3 ]] || _fa3=/tmp/gpukit-fa3/fa3.tar.xz
  if [[ ! -f $_fa3 ]]; then
    echo "setup_fa3: no fa3.tar.xz in .gpukit-fa3/ or /tmp/gpukit-fa3/: run benchmarks/pack_fa3.sh, carry it" >&2
  else
    _site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    xz -dc "$_fa3" | tar -C "$_site" -xf -
    python3 -c 'import torch, fa3_fwd._C' && echo "setup_fa3: fa3_fwd ready"
  fi
  unset _fa3 _site
fi
