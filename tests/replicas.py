"""Replicas and a load balancer for the platform tier (tests/platform): Triton replicas of one repository, HAProxy
in front of them with the shipped template (model_repository/platform/loadbalancer) rendered by its render.py, and
what each replica's own statistics say it served."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from factories import REPO_ROOT
from wan_triton.tritonserver.launch import RunningServer, free_port, start_server

# The model name the platform tier's repository is rendered under.
MODEL = "wan_lb"
LOADBALANCER = REPO_ROOT / "model_repository" / "platform" / "loadbalancer"
# HAProxy's health-check period here (the shipped default is 1 s): a replica is marked down after 3 failed checks.
CHECK_INTERVAL_MS = 500


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed (apt-get install -y haproxy; .ci/run installs it)")
        pytest.skip("haproxy is not installed (apt-get install -y haproxy)")
    return found


def start_replicas(repo: Path, folder: Path, count: int, **kwargs) -> list[RunningServer]:
    """`count` Triton servers of `repo`, started side by side; returns once every one is ready."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start_server, [repo], folder / f"replica{n}.log", 600, **kwargs) for n in range(count)]
        return [f.result() for f in futures]


def success_count(server: RunningServer, model: str) -> int:
    """How many requests of `model` this replica answered successfully, by Triton's own statistics."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(model, as_json=True)
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats["model_stats"])


class Balancer:
    """HAProxy as an unprivileged foreground process, its configuration rendered into a temporary folder."""

    def __init__(self, folder: Path, replicas: list[tuple[int, int]]) -> None:
        self.port, self.stats_port = free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "haproxy.cfg"
        rendered = subprocess.run(
            [
                sys.executable,
                str(LOADBALANCER / "render.py"),
                *(a for grpc, http in replicas for a in ("--replica", f"127.0.0.1:{grpc}:{http}")),
                *("--listen-port", str(self.port), "--bind", "127.0.0.1", "--stats-port", str(self.stats_port)),
                *("--check-interval-ms", str(CHECK_INTERVAL_MS)),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        self.config.write_text(rendered.stdout)
        self.log = folder / "haproxy.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [haproxy_binary(), "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "haproxy never listened"
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _rows(self) -> dict[str, dict[str, str]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5) as r:
            text = r.read().decode().lstrip("# ")
        return {
            row["svname"]: row
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "triton_grpc" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it (UP, DOWN, ...), from its statistics page."""
        return {name: row["status"].split()[0] for name, row in self._rows().items()}

    def checks(self) -> dict[str, str]:
        """Each replica's last health-check result (L7OK: Triton answered ready; INI: none finished yet; L4CON:
        connection refused; L7TOUT: no answer in time; ...), with "* " before it while a check is under way."""
        return {name: row["check_status"] for name, row in self._rows().items()}

    def wait_checked(self, replica: str, timeout_s: float = 30) -> None:
        """Wait until a health check of `replica` has passed. HAProxy 2.6 counts a server as UP from its start,
        before any check, so only a passed check shows that the checks reach Triton's readiness."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.checks().get(replica, "").removeprefix("* ") == "L7OK" and self.states().get(replica) == "UP":
                return
            time.sleep(0.05)
        raise AssertionError(f"{replica} never passed a check: {self.checks()} {self.states()}\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def requests(self) -> list[dict[str, str]]:
        """The requests HAProxy logged (option httplog), in the order they ended: the replica that served each, its
        HTTP status, the bytes sent back and the termination state ("----" for a request that ended normally)."""
        return [
            match.groupdict()
            for match in re.finditer(
                r" grpc_in triton_grpc/(?P<replica>\S+) \S+ (?P<status>-?\d+) (?P<bytes>\d+) \S+ \S+ "
                r"(?P<termination>\S{4}) .*\"(?P<request>[^\"]*)\"$",
                self.log_text(),
                re.MULTILINE,
            )
        ]

    def wait_state(self, replica: str, state: str, timeout_s: float = 30) -> float:
        """Wait until `replica` is in `state`; returns when (time.monotonic())."""
        deadline = time.monotonic() + timeout_s
        while (now := time.monotonic()) < deadline:
            if self.states().get(replica) == state:
                return now
            time.sleep(0.05)
        raise AssertionError(f"{replica} never {state}: {self.states()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
