#!/usr/bin/env bash
# Installs the GPU-host bundle (tools/gpu_bundle/pack.sh). setup.sh runs it and then exports the environment; run by
# hand it changes nothing in the calling shell. Everything goes under $WAN_GPU_HOME (default /tmp/wan-gpu):
#   tritonserver/  the server and its Python backend, the stub for the bundle's Python beside libtriton_python.so
#   venv/          a virtual environment of the host's python3: the bundle's packages first, then the host's own
#                  site-packages (torch, transformers, ...) through a .pth file; the pieces found (site, av, kernel
#                  add-ons); the project, installed editable from its checkout
#   lib/           libb64.so.0d, which perf_analyzer links
#   staged/        add-on parts copied there by tools/gpu_bundle/stage.sh in earlier commands on this host
#   host-site      the host's site-packages folders, torch's first
#   setup.sh, install.sh, MANIFEST   copies, so that later commands on this host can source $WAN_GPU_HOME/setup.sh
#                  without carrying the bundle again
# A second run only does what changed: another bundle (its MANIFEST) starts over (staged/ stays); a piece not yet
# installed is installed; a checkout elsewhere or a changed pyproject.toml installs the project again.
set -euo pipefail
BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOME_DIR=${WAN_GPU_HOME:-/tmp/wan-gpu}
VENV=$HOME_DIR/venv
STAGED=$HOME_DIR/staged

say() { echo "gpu-bundle: $*" >&2; }
die() {
  say "$*"
  exit 1
}
field() { sed -n "s/^$1=//p" "$2" | head -1; }

# The project: the folder holding the bundle folder, else the current folder.
if [[ -n ${WAN_GPU_PROJECT:-} ]]; then
  ROOT=$WAN_GPU_PROJECT
elif [[ -f $BUNDLE/../pyproject.toml ]]; then
  ROOT=$(dirname "$BUNDLE")
else
  ROOT=$PWD
fi
grep -q '^name = "wan-triton"' "$ROOT/pyproject.toml" 2>/dev/null ||
  die "no wan-triton checkout at $ROOT: run from the project root or set WAN_GPU_PROJECT"

[[ -f $BUNDLE/MANIFEST ]] || die "$BUNDLE/MANIFEST is missing: the bundle is incomplete (make gpu-bundle packs it)"
PY=$(field python "$BUNDLE/MANIFEST")
bundle_id=$(sha256sum "$BUNDLE/MANIFEST" | cut -c1-16)
changed=0

# The host's python3: the first on PATH that is not this bundle's (a shell that sourced setup.sh before has it first).
host_python() {
  local dir
  local -a dirs
  IFS=: read -ra dirs <<< "${PATH:-}"
  for dir in "${dirs[@]}"; do
    if [[ -n $dir && $dir != "$VENV/bin" && -x $dir/python3 ]]; then
      echo "$dir/python3"
      return 0
    fi
  done
  return 1
}

# 1. The server and the virtual environment, once per bundle.
if [[ $(cat "$HOME_DIR/bundle-id" 2>/dev/null || true) != "$bundle_id" || ! -x $VENV/bin/python3 ]]; then
  [[ -f $BUNDLE/tritonserver.tar.xz ]] || die "$BUNDLE has no tritonserver.tar.xz: source the setup.sh of the bundle folder"
  say "installing into $HOME_DIR (once for this bundle)"
  rm -rf "${HOME_DIR:?}/tritonserver" "${HOME_DIR:?}/lib" "$VENV" "$HOME_DIR/bundle-id" "$HOME_DIR/host-site"
  mkdir -p "$HOME_DIR/tritonserver" "$HOME_DIR/lib"

  python=${WAN_GPU_HOST_PYTHON:-$(host_python)} || die "no python3 on PATH"
  version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ $version == "$PY" ]] ||
    die "the bundle is for Python $PY but $python is $version: pack one with make gpu-bundle GPU_PYTHON=$version"
  # torch's folder first: the one benchmark and build steps put first on PYTHONPATH (HOST_SITE, see setup.sh).
  "$python" - > "$HOME_DIR/host-site" <<'PY'
import importlib.util
import os
import sys

spec = importlib.util.find_spec("torch")
if spec is None or not spec.origin:
    sys.exit("gpu-bundle: this python3 has no torch; the bundle runs on the host's PyTorch")
torch_site = os.path.dirname(os.path.dirname(spec.origin))
names = ("site-packages", "dist-packages")
others = [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in names and os.path.isdir(p) and p != torch_site]
print("\n".join([torch_site, *others]))
PY

  [[ $(sha256sum < "$BUNDLE/tritonserver.tar.xz" | cut -d' ' -f1) == "$(field tritonserver_sha256 "$BUNDLE/MANIFEST")" ]] ||
    die "$BUNDLE/tritonserver.tar.xz does not match MANIFEST (an incomplete copy?)"
  xz -dc "$BUNDLE/tritonserver.tar.xz" | tar -C "$HOME_DIR/tritonserver" -xf -
  libb64=("$HOME_DIR"/tritonserver/nvidia_pytriton.libs/libb64-*.so.0d)
  [[ -f ${libb64[0]} ]] || die "no libb64 among the Triton libraries"
  ln -s "${libb64[0]}" "$HOME_DIR/lib/libb64.so.0d"

  # Without pip: the bundle's own pip comes with the site piece (some hosts' Pythons lack ensurepip).
  "$python" -m venv --without-pip "$VENV"
  site=$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The pieces are packed with this layout.
  [[ $site == "$VENV/lib/python$PY/site-packages" ]] || die "unexpected site-packages $site in the new environment"
  # The host's packages after the bundle's, as the host's own python3 sees them: site.addsitedir also runs their
  # .pth files. The name sorts last, so the bundle's own .pth files (the project's editable finder) run first.
  "$VENV/bin/python3" - "$HOME_DIR/host-site" > "$site/zz_host_site_packages.pth" <<'PY'
import sys

dirs = [line for line in open(sys.argv[1]).read().splitlines() if line]
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs))
PY
  changed=1
fi
site=$VENV/lib/python$PY/site-packages

# 2. The pieces: the bundle's (site, av) and any kernel add-on, each from this bundle folder, the folders beside it or
#    in the project root (.gpu-bundle-*), or staged/. A piece whose parts are spread over several of them is found.
declare -a places=("$BUNDLE") look=()
if [[ $BUNDLE != "$HOME_DIR" ]]; then
  look+=("$BUNDLE"-*/)
fi
look+=("$ROOT"/.gpu-bundle*/ "$STAGED"/)
for dir in "${look[@]}"; do
  dir=$(cd "$dir" 2>/dev/null && pwd) || continue
  known=0
  for place in "${places[@]}"; do
    if [[ $place == "$dir" ]]; then
      known=1
    fi
  done
  if ((!known)); then
    places+=("$dir")
  fi
done
declare -A manifests=()
for dir in "${places[@]}"; do
  for manifest in "$dir"/*.manifest; do
    [[ -f $manifest ]] || continue
    name=$(field piece "$manifest")
    # The first found wins: a folder carried now before an older staged copy.
    [[ -n ${manifests[$name]:-} ]] || manifests[$name]=$manifest
  done
done

find_part() {
  local dir
  for dir in "${places[@]}"; do
    if [[ -f $dir/$1 ]]; then
      echo "$dir/$1"
      return 0
    fi
  done
  return 1
}

# install_piece NAME: 0 when installed (now or before), 1 when parts are missing (says which).
install_piece() {
  local name=$1
  local manifest=${manifests[$name]}
  local sha parts k part
  sha=$(field sha256 "$manifest")
  parts=$(field parts "$manifest")
  [[ $(field python "$manifest") == "$PY" ]] ||
    die "$manifest is packed for Python $(field python "$manifest"), the bundle for $PY"
  if [[ $(cat "$VENV/.pieces/$name" 2>/dev/null || true) == "$sha" ]]; then
    return 0
  fi
  local -a files=() missing=()
  for ((k = 1; k <= parts; k++)); do
    if part=$(find_part "$name.tar.xz.part$k"); then
      files+=("$part")
    else
      missing+=("$k")
    fi
  done
  if ((${#missing[@]})); then
    say "$name: part ${missing[*]} of $parts is not here; copy its folder to this host (tools/gpu_bundle/stage.sh" \
      "keeps it for later commands) and source setup.sh again"
    return 1
  fi
  [[ $(cat "${files[@]}" | sha256sum | cut -d' ' -f1) == "$sha" ]] ||
    die "$name: the parts (${files[*]}) do not make the archive its manifest names (parts of two packs? rm -rf $STAGED)"
  cat "${files[@]}" | xz -dc | tar -C "$VENV" -xf -
  mkdir -p "$VENV/.pieces"
  echo "$sha" > "$VENV/.pieces/$name"
  say "installed $name: $(field description "$manifest")"
  changed=1
}

for name in $(field required "$BUNDLE/MANIFEST"); do
  if [[ -n ${manifests[$name]:-} ]]; then
    install_piece "$name" || die "piece $name is incomplete"
  elif [[ ! -f $VENV/.pieces/$name ]]; then
    die "piece $name is not here: copy the folder that holds $name.manifest (e.g. .gpu-bundle-$name) to this host"
  fi
done
for name in "${!manifests[@]}"; do
  if ! grep -qw -- "$name" <<< "$(field required "$BUNDLE/MANIFEST")"; then
    install_piece "$name" || true  # an add-on still missing a part is reported and waits for it
  fi
done

# 3. Scripts point at this environment's python3 (packed as `#!/usr/bin/env python3`); perf_analyzer gets a wrapper
#    that finds its two libraries whatever the caller's LD_LIBRARY_PATH.
if ((changed)); then
  for script in "$VENV"/bin/*; do
    [[ -f $script && ! -L $script ]] || continue
    first=
    IFS= read -r first < "$script" || true
    if [[ $first == '#!/usr/bin/env python3' ]]; then
      sed -i "1s|.*|#!$VENV/bin/python3|" "$script"
    fi
  done
  cat > "$VENV/bin/perf_analyzer" <<EOF
#!/bin/sh
# perf_analyzer 2.51 links libb64.so.0d and libcudart.so.12; the bundle carries both.
LD_LIBRARY_PATH=$HOME_DIR/lib:$site/nvidia/cuda_runtime/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $VENV/libexec/perf_analyzer "\$@"
EOF
  chmod +x "$VENV/bin/perf_analyzer"
fi

# 4. The project, editable: the checkout's code is what runs, and a new commit in the same place needs nothing.
project_id="$ROOT $(sha256sum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [[ $(cat "$VENV/.project" 2>/dev/null || true) != "$project_id" ]]; then
  say "installing the project from $ROOT (editable)"
  # The host's pip configuration may name indexes it cannot reach; nothing is fetched here. The output (setuptools'
  # warnings about editable installs) is shown only when the install fails.
  if ! PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    "$VENV/bin/python3" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" \
    > "$HOME_DIR/project-install.log" 2>&1; then
    cat "$HOME_DIR/project-install.log" >&2
    die "the project's editable install failed (above)"
  fi
  echo "$project_id" > "$VENV/.project"
  changed=1
fi

# 5. After a change: what the server, its stub, the tests and the drivers import, in the stub's environment.
if ((changed)); then
  "$VENV/bin/python3" - <<'PY' || die "the environment is incomplete (above)"
import importlib
import sys

problems = []


def check(module, source):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure to import is reported the same way
        problems.append(f"  {module} ({source}): {type(exc).__name__}: {exc}")


numpy = check("numpy", "bundle")
if numpy is not None and not numpy.__version__.startswith("1."):
    problems.append(f"  numpy {numpy.__version__} comes first, not the bundle's 1.26 (Triton's stub needs numpy<2)")
# nvidia.cuda_runtime: libcudart.so.12 for perf_analyzer, found by benchmarks/perf_analyzer.py through this package.
bundled = ("pydantic", "av", "tritonclient.grpc", "diffusers", "ftfy", "pytest", "nvidia.cuda_runtime")
for module in (*bundled, "wan_triton.config.deployment"):
    check(module, "bundle")
for module in ("torch", "transformers", "accelerate", "safetensors", "sentencepiece", "yaml", "PIL", "grpc"):
    check(module, "host")
if problems:
    sys.exit("gpu-bundle: these do not import in the bundle's environment:\n" + "\n".join(problems))
PY
  "$VENV/bin/perf_analyzer" --version > /dev/null 2>&1 || die "perf_analyzer does not start: $VENV/bin/perf_analyzer"
fi

if [[ $(cat "$HOME_DIR/bundle-id" 2>/dev/null || true) != "$bundle_id" ]]; then
  if [[ $BUNDLE != "$HOME_DIR" ]]; then
    cp "$BUNDLE/MANIFEST" "$BUNDLE/setup.sh" "$BUNDLE/install.sh" "$HOME_DIR/"
  fi
  echo "$bundle_id" > "$HOME_DIR/bundle-id"
  say "ready; later commands on this host may source $HOME_DIR/setup.sh instead of carrying the bundle"
fi
