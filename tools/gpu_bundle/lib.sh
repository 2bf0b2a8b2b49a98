# Shared by pack.sh and pack_kernel.sh (sourced, after their `set -euo pipefail`): download pinned wheels for the GPU
# host's Python, install them into a tree laid out like a virtual environment, and write that tree as a "piece":
# one xz archive, split into parts small enough to be copied to the host one at a time, with a manifest that
# install.sh on the host reads to put the parts back together and check them.

GPU_PYTHON=${GPU_PYTHON:-3.12}
PYTHON=${PYTHON:-python3}
# pip --target into a temporary folder, not the system: its warning about running as root does not apply.
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
# Each part stays below what one copy to the host carries beside the repository (64 MiB).
PART_MIB=${PART_MIB:-55}
# --platform takes exact tags, so every manylinux level the wheels use is named; the host's glibc (2.39 on Ubuntu
# 24.04) accepts them all. nvidia-pytriton needs 2.35.
PLATFORM_ARGS=(--only-binary=:all: --implementation cp --python-version "$GPU_PYTHON"
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64)
SITE_DIR=lib/python$GPU_PYTHON/site-packages

need_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "gpu-bundle: $tool is needed to pack the bundle" >&2; exit 1; }
  done
}

# download DIR PIN...: the pinned wheels for the host's Python and platform, without their dependencies (every
# dependency the host lacks is pinned explicitly, so the bundle holds exactly what is listed).
download() {
  local dir=$1
  shift
  "$PYTHON" -m pip download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$dir" "$@"
}

# install_tree TREE WHEEL...: the wheels installed as they would be into a virtual environment at TREE:
# packages under $SITE_DIR, scripts under bin/ with a `#!/usr/bin/env python3` line that install.sh points at the
# host's environment.
install_tree() {
  local tree=$1
  shift
  local site=$tree/$SITE_DIR
  # --ignore-requires-python: pip checks Requires-Python against the interpreter running it, not --python-version
  # (the download above already chose wheels for the host's Python).
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --ignore-requires-python "${PLATFORM_ARGS[@]}" \
    --target "$site" "$@"
  if [[ -d $site/bin ]]; then
    mkdir -p "$tree/bin"
    mv "$site"/bin/* "$tree/bin/"
    rmdir "$site/bin"
  fi
  # pip --target records scripts as ../../bin/NAME from the folder it installed into; in a virtual environment
  # they are three levels up from site-packages.
  find "$site" -path '*.dist-info/RECORD' -exec sed -i 's|^\.\./\.\./bin/|../../../bin/|' {} +
  local script first
  for script in "$tree"/bin/*; do
    [[ -f $script ]] || continue
    IFS= read -r first < "$script" || true
    if [[ $first == '#!'*python* ]]; then
      sed -i '1s|.*|#!/usr/bin/env python3|' "$script"
    elif [[ $first == '#!/bin/sh' ]] && sed -n 2p "$script" | grep -q "^'''exec'"; then
      # pip's form for an interpreter path too long for a #! line: three lines that exec it
      sed -i '1,3d; 1i #!/usr/bin/env python3' "$script"
    fi
  done
  find "$tree" -name __pycache__ -prune -exec rm -rf {} +
}

# write_piece NAME TREE FOLDER DESCRIPTION WHEELS: TREE as NAME.tar.xz, split into parts of PART_MIB; one part goes
# to FOLDER, several to FOLDER-1, FOLDER-2, ... (each folder is copied to the host on its own). Every such folder gets
# NAME.manifest: the Python version, the number of parts, the archive's size and sha256, and the wheels (from the
# file WHEELS) it was made of.
write_piece() {
  local name=$1 tree=$2 folder=$3 description=$4 wheels=$5
  local work
  work=$(mktemp -d)
  tar -C "$tree" --sort=name --owner=0 --group=0 --numeric-owner -cf - . | xz -9 -T0 > "$work/$name.tar.xz"
  split -b "${PART_MIB}M" -d -a 1 --numeric-suffixes=1 "$work/$name.tar.xz" "$work/$name.tar.xz.part"
  local parts sha bytes k dest
  parts=$(find "$work" -name "$name.tar.xz.part*" | wc -l)
  sha=$(sha256sum "$work/$name.tar.xz" | cut -d' ' -f1)
  bytes=$(stat -c %s "$work/$name.tar.xz")
  # The parts of an earlier pack of this piece, wherever its number of parts put them.
  rm -f "$folder/$name".tar.xz.part* "$folder/$name.manifest"
  rm -rf "$folder"-[0-9]*
  for ((k = 1; k <= parts; k++)); do
    dest=$folder
    ((parts == 1)) || dest=$folder-$k
    mkdir -p "$dest"
    mv "$work/$name.tar.xz.part$k" "$dest/"
    {
      echo "piece=$name"
      echo "description=$description"
      echo "python=$GPU_PYTHON"
      echo "parts=$parts"
      echo "bytes=$bytes"
      echo "sha256=$sha"
      cat "$wheels"
    } > "$dest/$name.manifest"
  done
  if [[ -d $folder ]]; then
    rmdir --ignore-fail-on-non-empty "$folder"
  fi
  rm -rf "$work"
}

# wheels_list DIR: one `wheel=FILE` line per wheel downloaded into DIR, for a piece's manifest.
wheels_list() {
  local wheel
  for wheel in "$1"/*.whl; do
    echo "wheel=$(basename "$wheel")"
  done
}
