# Sourced by the one-GPU benchmark drivers (gpu_runtime.sh, gpu_parallel.sh) on the GPU host, from the project root
# after `source .gpukit/setup.sh`: installs the wheels the kit lacks (.whl/: pydantic, pytest) into /tmp/site and
# sets OUT, PYTHONPATH and COMMIT.
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
# The host's own site-packages first: its scipy and sklearn need its numpy 2 (the kit's numpy 1.26 is for Triton).
HOST_SITE=$(ls -d /opt/torch/.venv/lib/python3*/site-packages 2>/dev/null | head -1)
export PYTHONPATH=$HOST_SITE:/tmp/site PYTHONUNBUFFERED=1
export COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
