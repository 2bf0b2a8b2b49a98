"""Start the real Triton Inference Server on a rendered model repository, in the foreground.

The `tritonserver` binary and its Python backend come from the nvidia-pytriton wheel (or from $TRITONSERVER and
$TRITON_BACKEND_DIR, as the GPU-host bundle sets them: docs/gpu-hosts.md). Three needs of that Python backend are
met here:
- its stub takes site-packages from the first `python3` on PATH (it ignores PYTHONPATH), so this interpreter's
  environment goes first on PATH;
- its stub links a system libpython, which may be an older patch release than this interpreter; this
  interpreter's LIBDIR goes first on LD_LIBRARY_PATH so extension modules (ssl) find the symbols they need;
- the stub for this Python version must sit in the backend folder, which is assembled once under the venv.

This process stays tritonserver's parent and bounds its stop (`supervise`): SIGTERM/SIGINT are passed on, and a
server still running `exit_timeout_s` + `KILL_MARGIN_S` later is killed with its stubs, and its shared memory
removed. Triton 2.51's gRPC frontend waits for every open stream at a stop, even after its own exit timeout
expired, so one client that leaves a stream open would otherwise keep the server (and its stubs, and their
shared-memory regions) alive for as long as it likes.

It also ends a load that Triton's Python backend would hang (`waited_stub`): while a model instance initialises,
the backend takes a stub that has not set its health flag within a second for dead, and then waits for it to
exit, which a live stub never does. The stub it waits on is killed, so that load fails with Triton's own
message and the server, which exits on any failed load, exits (docs/triton-2.51-notes.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from wan_triton.config.deployment import DEPLOYMENT_FILE, REPOSITORY_MARKER, Deployment

logger = logging.getLogger(__name__)

# Triton's own bound on unloading the models at a stop (its --exit-timeout-secs; 30 is its default).
EXIT_TIMEOUT_S = 30
# How long past that a stopping server may take before the launcher kills it: the unload after the timeout and
# Triton's own teardown take a second or two.
KILL_MARGIN_S = 5
# Every shared-memory region of one server's Python backend starts with this, then the launcher's pid: what a
# killed server leaves in /dev/shm is found by name, and only that server's.
SHM_PREFIX = "wan_triton_shm_"
SHM_DIR = Path("/dev/shm")
# How long a thread of tritonserver may wait for a live stub to exit, before any stop, until the stub is killed.
# Nothing in a start or a serving server waits for a stub that long but the backend's hang (`waited_stub`).
STUB_WAIT_KILL_S = 10
# The number of wait4, the system call behind waitpid, in /proc/<pid>/task/<tid>/syscall.
_WAIT4 = {"x86_64": 61, "aarch64": 260}
_STUB_COMM = "triton_python_b"  # the kernel keeps 15 characters of "triton_python_backend_stub"


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
    exit_timeout_s: int = EXIT_TIMEOUT_S,
    shm_prefix: str | None = None,
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
        *([f"--backend-config=python,shm-region-prefix-name={shm_prefix}"] if shm_prefix else []),
        "--exit-on-error=true",
        # `make build` renders every config.pbtxt in full, so auto-completion has nothing to add; left on, Triton
        # starts a second Python-backend stub per model at load only to ask it, which doubles the stubs started at
        # once and roughly doubled the load time of a many-model repository on a 2-core machine.
        "--disable-auto-complete-config",
        f"--exit-timeout-secs={exit_timeout_s}",
        "--strict-readiness=true",
        f"--log-verbose={log_verbose}",
        *pools,
        *cache,
    ]


def shm_prefix_of(launcher_pid: int) -> str:
    return f"{SHM_PREFIX}{launcher_pid}_"


def remove_shared_memory(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink the shared-memory regions whose names start with `prefix`; returns their names."""
    removed = []
    for region in sorted(shm_dir.glob(f"{prefix}*")):
        try:
            region.unlink()
        except FileNotFoundError:
            continue
        removed.append(region.name)
    return removed


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group (zombies, which hold nothing but their exit status, left out)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        parsed = _stat(int(stat.parent.name))
        if parsed is not None and parsed[1][0] != "Z" and int(parsed[1][2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _stat(pid: int) -> tuple[str, list[str]] | None:
    """Process `pid`'s command name and the fields of /proc/<pid>/stat after it (state, ppid, pgrp, ...); None once
    it is gone."""
    try:
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split at its last ")".
        head, rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
    except (OSError, ValueError):
        return None
    return head.split("(", 1)[-1], rest.split()


def _live_stub(pid: int) -> bool:
    parsed = _stat(pid)
    return parsed is not None and parsed[0] == _STUB_COMM and parsed[1][0] != "Z"


def waited_stub(server_pid: int) -> int | None:
    """The Python-backend stub a thread of the tritonserver `server_pid` is blocked waiting for (waitpid), if any.

    Triton 2.51's Python backend waits so for a stub it took for dead while the stub's instance initialised
    (`StubLauncher::Launch`, after a missed health check); the stub, alive and only slow, never exits, and the load
    never ends. A stub exiting after its finalize is waited for too, briefly.
    """
    number = _WAIT4.get(platform.machine())
    if number is None:
        return None
    for task in Path(f"/proc/{server_pid}/task").glob("*"):
        try:
            fields = (task / "syscall").read_text().split()
        except OSError:
            continue
        if len(fields) > 1 and fields[0] == str(number):
            pid = int(fields[1], 16)
            if pid > 0 and _live_stub(pid):
                return pid
    return None


def _kill_group(process: subprocess.Popen, wait_s: float = 10) -> None:
    """SIGKILL every process of the group `process` leads, reap it, and wait (up to `wait_s`) until none is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        pass
    while (left := group_members(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        logger.error("processes %s of the server's group still exist %.0f s after SIGKILL", left, wait_s)


def supervise(
    cmd: list[str], env: dict[str, str], exit_timeout_s: float, shm_prefix: str, shm_dir: Path = SHM_DIR
) -> int:
    """Run the server in its own process group until it exits; returns its exit code (1 when it had to be killed).

    The first SIGTERM or SIGINT is passed on and starts the clock; a server still running `exit_timeout_s` +
    KILL_MARGIN_S later is killed with every process of its group (the Python backend's stubs). Whatever way it
    ended, stubs left behind are killed and the regions named with `shm_prefix` are removed.
    """
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    stop_asked: list[float] = []

    def pass_on(signum, _frame) -> None:
        if not stop_asked:
            stop_asked.append(time.monotonic())
            logger.info("signal %d: stopping tritonserver (pid %d)", signum, process.pid)
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    killed = False
    waited: tuple[int, float] | None = None  # the stub tritonserver waits for, and since when
    while True:
        try:
            returncode = process.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if not stop_asked:
                waited = _end_a_hung_load(process.pid, waited)
            if stop_asked and time.monotonic() - stop_asked[0] > exit_timeout_s + KILL_MARGIN_S:
                logger.error(
                    "tritonserver still running %.0f s after the stop signal (an open client stream holds it); "
                    "killing it and its stubs",
                    exit_timeout_s + KILL_MARGIN_S,
                )
                _kill_group(process)
                killed = True
    # The group outlives its leader while a stub still runs: stubs of a server that crashed or was killed.
    _kill_group(process)
    removed = remove_shared_memory(shm_prefix, shm_dir)
    if removed:
        logger.warning("removed %d shared-memory region(s) the server left: %s", len(removed), ", ".join(removed))
    return 1 if killed else returncode


def _end_a_hung_load(server_pid: int, waited: tuple[int, float] | None) -> tuple[int, float] | None:
    """Kill the stub tritonserver has waited on since `waited` says, once that is STUB_WAIT_KILL_S ago; returns what
    to pass next time."""
    stub = waited_stub(server_pid)
    if stub is None:
        return None
    now = time.monotonic()
    since = waited[1] if waited is not None and waited[0] == stub else now
    if now - since < STUB_WAIT_KILL_S:
        return stub, since
    logger.error(
        "tritonserver has waited %.0f s for its Python-backend stub %d to exit: the backend took the stub for "
        "dead while its model instance initialised, and the load would never end; killing the stub, so the "
        "load fails",
        now - since,
        stub,
    )
    try:
        os.kill(stub, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run tritonserver on a rendered Wan2.2 model repository.")
    parser.add_argument(
        "--repo", type=Path, required=True, action="append", help="model repository made by `make build` (repeatable)"
    )
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument(
        "--exit-timeout-s",
        type=int,
        default=EXIT_TIMEOUT_S,
        help=f"Triton's bound on unloading at a stop; a server still running {KILL_MARGIN_S} s after it is killed",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
        exit_timeout_s=args.exit_timeout_s,
        shm_prefix=shm_prefix_of(os.getpid()),
    )
    print("starting:", " ".join(cmd), file=sys.stderr, flush=True)
    return supervise(cmd, server_environment(), args.exit_timeout_s, shm_prefix_of(os.getpid()))


if __name__ == "__main__":
    sys.exit(main())
