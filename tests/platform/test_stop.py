"""A stop is bounded whatever clients do: a client holding an idle stream open no longer keeps the server alive.

Triton 2.51's gRPC frontend waits for every open stream at a stop, past its own exit timeout; the launcher
(wan_triton.tritonserver.server) kills the server and its stubs `KILL_MARGIN_S` after that timeout and removes
their shared memory.
"""

from __future__ import annotations

import signal
import subprocess
import time

from replicas import MODEL
from served import Stream
from wan_client.client import STREAM_SUFFIX
from wan_triton.tritonserver.launch import start_server
from wan_triton.tritonserver.server import KILL_MARGIN_S, SHM_DIR, group_members, shm_prefix_of

EXIT_TIMEOUT_S = 5


def test_a_stop_with_an_idle_stream_open_ends_within_the_exit_timeout_and_leaves_no_shared_memory(tiny_repo, tmp_path):
    server = start_server([tiny_repo], tmp_path / "tritonserver.log", 600, exit_timeout_s=EXIT_TIMEOUT_S)
    prefix = shm_prefix_of(server.process.pid)
    stream = Stream(server.grpc_url, MODEL + STREAM_SUFFIX)
    try:
        stream.send(dict(prompt="an idle stream", seed=3, height=32, width=32, num_frames=1, num_inference_steps=2))
        stream.until_final()  # answered through "done"; the stream stays open, idle
        regions = sorted(SHM_DIR.glob(f"{prefix}*"))
        assert regions, f"no shared memory named {prefix}*: the prefix does not reach the Python backend"
        group = _server_group(server.process.pid)
        stopped_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # Readiness goes off at once while the server still runs: what a load balancer's check drains it by.
        while server.is_ready():
            assert time.monotonic() - stopped_at < 2, "still ready 2 s after SIGTERM"
            time.sleep(0.1)
        assert server.process.poll() is None
        server.process.wait(EXIT_TIMEOUT_S + 10)
        took_s = time.monotonic() - stopped_at
    finally:
        stream.close()
        if server.process.poll() is None:
            server.stop()
    log = server.log_tail(60)
    # The launcher killed it (exit 1, and says so): the stream did hold it past Triton's own exit timeout.
    assert server.process.returncode == 1, log
    assert "killing it and its stubs" in log, log
    assert EXIT_TIMEOUT_S <= took_s <= EXIT_TIMEOUT_S + KILL_MARGIN_S + 3, took_s
    assert not group_members(group), "processes of the server's group outlived the stop"
    assert not sorted(SHM_DIR.glob(f"{prefix}*")), "shared memory of the server left behind"


def _server_group(launcher_pid: int) -> int:
    child = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True, check=True)
    return int(child.stdout.split()[0])  # tritonserver leads a session (and group) of its own
