"""Start a Triton server in the background, wait until it is ready, and stop it cleanly.

Used by the integration tests, the benchmarks and `make run`. The server runs as
`python -m wan_triton.tritonserver.server` in its own process group; stopping sends SIGTERM (what an orchestrator
sends) to that launcher, which bounds the stop (wan_triton.tritonserver.server), and waits for it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wan_triton.tritonserver.server import EXIT_TIMEOUT_S, KILL_MARGIN_S

logger = logging.getLogger(__name__)

# Triton's log lines for a model's load and unload, its errors, and its exit countdown ("Timeout 12: Found 1 live
# models ...").
_LOADING = re.compile(r"\"loading: ([^:\"]+):\d+\"")
_LOADED = re.compile(r"successfully loaded '([^']+)'")
_UNLOADED = re.compile(r"successfully unloaded '([^']+)'")
_COUNTDOWN = re.compile(r"\] \"Timeout \d+: Found ")
_ERROR = re.compile(r"^E\d{4} ")
# What a start shows when Triton 2.51's Python backend took a stub for dead while its model instance initialised (a
# missed health check on a loaded host): the load fails ("not healthy"; the launcher ends the hang that otherwise
# follows, wan_triton.tritonserver.server), or the server aborts when the stub, resuming, reads the arguments the
# backend freed. A fault of the backend, not of the models: a second start is worth it (docs/triton-2.51-notes.md).
STUB_TAKEN_FOR_DEAD = re.compile(
    r"Stub process '[^']+' is not healthy|Failed to obtain the health mutex|boost::interprocess::lock_exception"
)
# Error lines Triton logs at every start on a host without a GPU; they say nothing about a failed start.
_NO_GPU_NOISE = re.compile(r"CudaDriverHelper has not been initialized|unable to create stream for ")


def _models(pattern: re.Pattern[str], lines: list[str]) -> set[str]:
    """The model names `pattern` (one of the load/unload lines above) finds in the log."""
    return {m.group(1) for line in lines if (m := pattern.search(line))}


def _tail(lines: list[str], num_lines: int) -> list[str]:
    """The log's last lines without the once-a-second exit countdown, which otherwise fills them."""
    return [line for line in lines if not _COUNTDOWN.search(line)][-num_lines:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_ready(http_port: int) -> bool:
    """Whether the Triton server on this host's `http_port` reports ready (every model loaded and warmed up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class RunningServer:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def is_ready(self) -> bool:
        return server_ready(self.http_port)

    def _log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []

    def log_tail(self, num_lines: int = 40) -> str:
        return "\n".join(self._log_lines()[-num_lines:])

    def shutdown_report(self, num_lines: int = 40) -> str:
        """Why a stop did not end cleanly: the models Triton loaded but never unloaded (the usual cause of "Exit
        timeout expired"), then the log's tail without the once-a-second exit countdown, which otherwise fills it."""
        lines = self._log_lines()
        stuck = ", ".join(sorted(_models(_LOADED, lines) - _models(_UNLOADED, lines))) or "none"
        return f"models never unloaded: {stuck}\n" + "\n".join(_tail(lines, num_lines))

    def startup_report(self, num_lines: int = 40, num_errors: int = 20) -> str:
        """Why a start did not end ready: the models Triton began to load and never loaded (the one that failed or
        hangs), Triton's error lines (a failed load's message is there, not in the tail), then the log's tail."""
        lines = self._log_lines()
        pending = ", ".join(sorted(_models(_LOADING, lines) - _models(_LOADED, lines))) or "none"
        errors = [line for line in lines if _ERROR.match(line) and not _NO_GPU_NOISE.search(line)][:num_errors]
        return "\n".join([f"models never loaded: {pending}", "errors:", *errors, "log tail:", *_tail(lines, num_lines)])

    def stub_taken_for_dead(self) -> bool:
        """Whether the log shows the Python backend taking a loading model's stub for dead (STUB_TAKEN_FOR_DEAD)."""
        return any(STUB_TAKEN_FOR_DEAD.search(line) for line in self._log_lines())

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.startup_report()}")
            if self.is_ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.startup_report()}")

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + KILL_MARGIN_S + 30) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL only if it hangs past the timeout).

        The launcher itself kills a server that outlives its exit timeout by KILL_MARGIN_S, so the timeout here is
        only a last resort against a launcher that hangs.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("tritonserver ignored SIGTERM for %.0f s; killing it", timeout_s)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def start_server(
    repos: list[Path],
    log_path: Path,
    ready_timeout_s: float = 300,
    exit_timeout_s: int = EXIT_TIMEOUT_S,
    ports: tuple[int, int, int] | None = None,
    attempts: int = 2,
) -> RunningServer:
    """Start the launcher on `repos` (on `ports`: http, grpc, metrics, or free ones) and wait until it is ready.

    A start that fails because Triton's Python backend took a loading stub for dead (`stub_taken_for_dead`) is
    tried again, up to `attempts` starts in all; the failed start's log is kept beside `log_path` as
    `<stem>.attempt<n><suffix>`. Any other failure is raised at once.
    """
    attempt = 1
    while True:
        server = _start(repos, log_path, exit_timeout_s, ports)
        try:
            server.wait_ready(ready_timeout_s)
            return server
        except BaseException as exc:
            server.stop()
            if not isinstance(exc, Exception) or attempt >= attempts or not server.stub_taken_for_dead():
                raise
            failure = exc  # its message carries the start's report
        kept = log_path.with_name(f"{log_path.stem}.attempt{attempt}{log_path.suffix}")
        log_path.replace(kept)
        logger.warning(
            "start %d of %d failed: Triton's Python backend took a loading model's stub for dead; starting again "
            "(log of the failed start: %s)\n%s",
            attempt,
            attempts,
            kept,
            failure,
        )
        attempt += 1


def _start(repos: list[Path], log_path: Path, exit_timeout_s: int, ports: tuple[int, int, int] | None) -> RunningServer:
    http, grpc, metrics = ports or (free_port(), free_port(), free_port())
    cmd = [
        sys.executable,
        "-m",
        "wan_triton.tritonserver.server",
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
        "--exit-timeout-s",
        str(exit_timeout_s),
    ]
    for repo in repos:
        cmd += ["--repo", str(repo)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return RunningServer(process, http, grpc, metrics, log_path)


@contextlib.contextmanager
def running_server(
    repos: list[Path], log_path: Path, ready_timeout_s: float = 300, exit_timeout_s: int = EXIT_TIMEOUT_S
) -> Iterator[RunningServer]:
    server = start_server(repos, log_path, ready_timeout_s, exit_timeout_s)
    try:
        yield server
    finally:
        server.stop(exit_timeout_s + KILL_MARGIN_S + 30)


def demo(argv: list[str] | None = None) -> int:
    """`make run`: start the server, generate one MP4 through the gRPC client, stop the server."""
    parser = argparse.ArgumentParser(description="Generate a sample video through a freshly started server.")
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path("out/sample.mp4"))
    parser.add_argument("--prompt", default="a red robot walks through a forest at sunset, cinematic")
    parser.add_argument("--log", type=Path, default=Path("out/tritonserver.log"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.info("starting tritonserver (log: %s)", args.log)
    with running_server([args.repo], args.log) as server:
        logger.info("server ready; generating")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "wan_client",
                "--url",
                server.grpc_url,
                "--prompt",
                args.prompt,
                "--seed",
                "42",
                "--output",
                str(args.output),
            ],
            check=False,
        )
    if result.returncode != 0:
        return result.returncode
    print(args.output.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(demo())
