"""Start the real Triton Inference Server on a rendered model repository, in the foreground.

The `tritonserver` binary and its Python backend come from the nvidia-pytriton wheel (or from $TRITONSERVER and
$TRITON_BACKEND_DIR, as the GPU-host bundle sets them: docs/gpu-hosts.md). Three needs of that Python backend are
met here:
- its stub takes site-packages from the first `python3` on PATH (it ignores PYTHONPATH), so this interpreter's
  environment goes first on PATH;
- its stub links a system libpython, which may be an older patch release than this interpreter; this
  interpreter's LIBDIR goes first on LD_LIBRARY_PATH so extension modules (ssl) find the symbols they need;
- the stub for this Python version must sit in the backend folder, which is assembled once under the venv.
The process execs into tritonserver, so SIGTERM/SIGINT reach the server directly and it shuts down cleanly.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from wan_triton.config.deployment import DEPLOYMENT_FILE, REPOSITORY_MARKER, Deployment

logger = logging.getLogger(__name__)


def _pytriton_root() -> Path:
    # Located without importing: the pytriton package itself needs dependencies this project does not install.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed and $TRITONSERVER is not set")
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def tritonserver_binary() -> Path:
    env = os.environ.get("TRITONSERVER")
    return Path(env) if env else _pytriton_root() / "bin" / "tritonserver"


def backend_directory() -> Path:
    """A backend folder whose python/ holds the stub built for this interpreter's Python version."""
    env = os.environ.get("TRITON_BACKEND_DIR")
    if env:
        return Path(env)
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"no Triton Python backend stub for Python {version} in {root}")
    target = Path(sys.prefix) / "triton_backends"
    python_dir = target / "python"
    if not (python_dir / stub.name).is_file():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(root / "backends", target)
        shutil.copy2(stub, python_dir / stub.name)
    return target


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    libdirs = [sysconfig.get_config_var("LIBDIR") or ""]
    if "TRITON_BACKEND_DIR" not in os.environ:
        # The copied stub's relative RPATH no longer reaches the wheel's bundled libraries (libcudart, ...).
        libdirs.append(str(_pytriton_root().parent.parent / "nvidia_pytriton.libs"))
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libdirs if d)
    return env


def cache_directory() -> Path | None:
    """Where Triton finds its cache implementations (`local/libtritoncache_local.so`).

    $TRITON_CACHE_DIR when set; Triton's own default (/opt/tritonserver/caches) for a $TRITONSERVER from elsewhere;
    otherwise the nvidia-pytriton wheel's `caches/` folder.
    """
    env = os.environ.get("TRITON_CACHE_DIR")
    if env:
        return Path(env)
    if os.environ.get("TRITONSERVER"):
        return None
    return _pytriton_root() / "caches"


def _recorded_deployments(repos: list[Path]):
    """The deployment each repository was rendered for (every model of one repository records the same one)."""
    for repo in repos:
        recorded = sorted(repo.glob(f"*/{DEPLOYMENT_FILE}"))
        if recorded:
            yield Deployment.model_validate_json(recorded[0].read_text(encoding="utf-8"))


def cuda_memory_pool_bytes(repos: list[Path]) -> int:
    """Triton's CUDA memory pool per GPU for these repositories: the largest `serving.cuda_memory_pool_mib` of those
    with a component on a GPU, in bytes; 0 (Triton's default pool) when nothing runs on a GPU."""
    sizes = [
        d.serving.cuda_memory_pool_mib << 20
        for d in _recorded_deployments(repos)
        if any(getattr(d.components, c).device == "cuda" for c in ("text_encoder", "denoiser", "vae_decoder"))
    ]
    return max(sizes, default=0)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def result_cache_bytes(repos: list[Path]) -> int:
    """The response cache size the repositories ask for: the sum of each rendered deployment's result_cache_bytes.

    Triton has one cache for the whole server, shared by every model that enables it, so each repository's budget
    is added; every model of one repository records the same deployment, so one `deployment.json` per repository
    is read.
    """
    return sum(d.result_cache_bytes for d in _recorded_deployments(repos))


def server_command(
    repos: list[Path],
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    log_verbose: int = 0,
    cache_bytes: int = 0,
    cuda_pool_bytes: int = 0,
    num_gpus: int = 0,
) -> list[str]:
    # One pool per GPU: every GPU model instance may hand tensors to the next step on its own GPU.
    gpus = range(num_gpus if cuda_pool_bytes else 0)
    pools = [f"--cuda-memory-pool-byte-size={gpu}:{cuda_pool_bytes}" for gpu in gpus]
    cache = []
    if cache_bytes > 0:
        directory = cache_directory()
        cache = [f"--cache-config=local,size={cache_bytes}"]
        if directory is not None:
            cache.append(f"--cache-directory={directory}")
    return [
        str(tritonserver_binary()),
        *(f"--model-repository={repo.resolve()}" for repo in repos),
        f"--backend-directory={backend_directory()}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        # Decoded videos are hundreds of MB at 720p: grow the Python backend's shared memory in large steps.
        "--backend-config=python,shm-default-byte-size=67108864",
        "--backend-config=python,shm-growth-byte-size=67108864",
        "--exit-on-error=true",
        "--strict-readiness=true",
        f"--log-verbose={log_verbose}",
        *pools,
        *cache,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run tritonserver on a rendered Wan2.2 model repository.")
    parser.add_argument(
        "--repo", type=Path, required=True, action="append", help="model repository made by `make build` (repeatable)"
    )
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args(argv)
    for repo in args.repo:
        if not (repo / REPOSITORY_MARKER).is_file():
            parser.error(f"{repo} is not a model repository made by `make build`")
    pool = cuda_memory_pool_bytes(args.repo)
    cmd = server_command(
        args.repo,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        args.log_verbose,
        cache_bytes=result_cache_bytes(args.repo),
        cuda_pool_bytes=pool,
        num_gpus=gpu_count() if pool else 0,
    )
    print("starting:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, server_environment())


if __name__ == "__main__":
    main()
