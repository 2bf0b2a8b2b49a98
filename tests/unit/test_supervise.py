"""The launcher's bounded stop (wan_triton.tritonserver.server.supervise) on stand-in servers: shell processes that
ignore SIGTERM, leave a child in their process group and a file named with the shared-memory prefix."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from wan_triton.tritonserver import server as triton_server

PREFIX = "wan_triton_shm_test_"


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _alive(pid_file) -> bool:
    """Whether the process still runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{int(pid_file.read_text())}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_server_that_ignores_sigterm_is_killed_with_its_group_after_the_exit_timeout(
    tmp_path, monkeypatch, restore_signals
):
    monkeypatch.setattr(triton_server, "KILL_MARGIN_S", 0.5)
    script = (
        f"trap '' TERM; sleep 300 & echo $! > {tmp_path}/child; touch {tmp_path}/{PREFIX}region {tmp_path}/other; "
        "while true; do sleep 0.1; done"
    )
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    code = triton_server.supervise(["sh", "-c", script], dict(os.environ), 1.0, PREFIX, tmp_path)
    took_s = time.monotonic() - started
    timer.join()
    assert code == 1
    # SIGTERM at 1 s, exit timeout 1 s, margin 0.5 s.
    assert 2.5 <= took_s < 5, took_s
    assert not _alive(tmp_path / "child")
    assert not (tmp_path / f"{PREFIX}region").exists()
    assert (tmp_path / "other").exists()  # only the server's own regions


def test_a_server_that_stops_in_time_keeps_its_exit_code_and_its_regions_are_removed(tmp_path, restore_signals):
    script = f"touch {tmp_path}/{PREFIX}left; trap 'exit 3' TERM; while true; do sleep 0.1; done"
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    code = triton_server.supervise(["sh", "-c", script], dict(os.environ), 30, PREFIX, tmp_path)
    timer.join()
    assert code == 3
    assert time.monotonic() - started < 5
    assert not (tmp_path / f"{PREFIX}left").exists()
