"""A parallel plan through the real Triton server: the scheduler model runs a worker group of 2 gloo processes
(tp 2, from build-time shards), the vae_decoder model another 2 (the decode split by width), and the frames match
diffusers' WanPipeline; a worker of either group killed between requests is replaced before the next one (a worker
killed mid-request: tests/multiprocess/test_worker_group.py); a request past its deadline stops every rank
mid-loop and the same workers serve the next request; the stream endpoint shows previews from rank 0's clean
estimates."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from checks import assert_frames_close, logged_stops, reference_frames
from factories import LONGEST_CPU
from served import PARALLEL_MODEL, Stream, infer, metric_samples, metric_value
from served import REQUEST as SERVER_REQUEST
from wan_client import build_infer_inputs

# The server tests' request with 9 frames and 6 steps.
REQUEST = {**SERVER_REQUEST, "num_frames": 9, "num_inference_steps": 6}

# The loop runs far longer than the test's 3 s deadline here.
LONG = {**REQUEST, **LONGEST_CPU}


@pytest.fixture(scope="module")
def reference(tiny4_checkpoint):
    return reference_frames(tiny4_checkpoint, **dict(REQUEST))


def _frames(client):
    return infer(client, PARALLEL_MODEL, REQUEST, ("frames",)).as_numpy("frames")


def _scheduler_dir(server) -> Path:
    return server.log_path.parent / f"repo_{PARALLEL_MODEL}" / f"{PARALLEL_MODEL}_scheduler"


def _workers(server, stage: str = "scheduler") -> list[int]:
    """A worker group's processes: the children that multiprocessing's spawn started from the Python backend stub
    of `stage` (the scheduler's denoiser group, the vae_decoder's split decode)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))

    def cmdline(pid: int) -> bytes:
        try:
            return (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            return b""

    model_dir = f"{PARALLEL_MODEL}_{stage}/".encode()
    # The server process is the launcher; tritonserver is its child, and the stubs are tritonserver's children.
    below = children.get(server.process.pid, [])
    candidates = below + [pid for child in below for pid in children.get(child, [])]
    stubs = [pid for pid in candidates if model_dir in cmdline(pid)]
    assert len(stubs) == 1, f"no single stub of {PARALLEL_MODEL}_{stage}: {stubs}"
    return sorted(child for child in children.get(stubs[0], []) if b"spawn_main" in cmdline(child))


def test_parallel_plan_frames_match_wan_pipeline(client, reference):
    assert_frames_close(_frames(client), reference)


def test_repository_records_the_plan_and_its_shards(server):
    scheduler = _scheduler_dir(server)
    deployment = json.loads((scheduler / "deployment.json").read_text())
    assert deployment["components"]["denoiser"]["parallel"] == {"cfg": 1, "ulysses": 1, "tp": 2}
    assert deployment["components"]["vae_decoder"]["split_width"] == 2
    manifest = json.loads((scheduler / "1" / "tp2-float32" / "manifest.json").read_text())
    assert manifest["plan"] == {"cfg": 1, "ulysses": 1, "tp": 2}
    assert manifest["experts"]["transformer"]["files"] == [
        "transformer/tp0-of-2.safetensors",
        "transformer/tp1-of-2.safetensors",
    ]


def _wait_until_dead(pid: int, timeout_s: float = 30.0) -> None:
    """Until the process is gone or a zombie (dead, not yet reaped by its parent, the scheduler's stub)."""
    deadline = time.monotonic() + timeout_s
    status = Path(f"/proc/{pid}/status")
    while time.monotonic() < deadline:
        try:
            state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
        except (FileNotFoundError, ProcessLookupError):
            return
        if "Z" in state.split()[1]:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still alive {timeout_s} s after SIGKILL")


@pytest.mark.parametrize("stage", ["scheduler", "vae_decoder"], ids=["denoiser-group", "vae-group"])
def test_worker_killed_between_requests_is_replaced(server, client, reference, stage):
    workers = _workers(server, stage)
    assert len(workers) == 2, workers
    restarts = dict(model=PARALLEL_MODEL, stage=stage)
    before = metric_value(metric_samples(server), "wan_worker_group_restarts_total", **restarts)
    os.kill(workers[1], signal.SIGKILL)
    _wait_until_dead(workers[1])  # a kill is delivered asynchronously: "between requests" means dead before the next
    assert_frames_close(_frames(client), reference)
    replaced = _workers(server, stage)
    assert len(replaced) == 2 and set(replaced).isdisjoint(workers), (workers, replaced)
    # One restart, counted for the alert rules (model_repository/platform/prometheus).
    assert metric_value(metric_samples(server), "wan_worker_group_restarts_total", **restarts) == before + 1


def test_size_the_sequence_cannot_split_over_is_still_served(client):
    # tp splits heads, not tokens: any size works (ulysses would need the token count divisible by its degree).
    request = {**REQUEST, "height": 16, "width": 16, "num_frames": 1, "num_inference_steps": 1}
    assert infer(client, PARALLEL_MODEL, request, ("frames",)).as_numpy("frames").shape == (1, 16, 16, 3)


def test_deadline_stops_every_rank_mid_loop_and_keeps_the_group(server, client, reference):
    # The scheduler's step hook sees the deadline; the ranks agree after each step
    # (wan_triton.workers.step_agreement) and stop together soon after, instead of running out the loop, so the same
    # processes serve the next request.
    workers = _workers(server)
    log_start = server.log_path.stat().st_size
    with pytest.raises(InferenceServerException) as caught:
        client.infer(PARALLEL_MODEL, build_infer_inputs({**LONG, "timeout_s": 3.0}))
    assert caught.value.status() == "StatusCode.CANCELLED", caught.value
    noticed = re.search(r"timeout_s: deadline exceeded: .* after step (\d+) of 50", caught.value.message())
    assert noticed, caught.value.message()
    with server.log_path.open("rb") as log:
        log.seek(log_start)
        text = log.read().decode("utf-8", errors="replace")
    stops = logged_stops(text)
    assert len(stops) == 1 and int(noticed.group(1)) <= stops[0] < 50, (noticed.group(0), stops)
    assert _workers(server) == workers  # not rebuilt
    assert_frames_close(_frames(client), reference)


def test_stream_previews_come_from_rank_0s_estimates(server, client):
    stream = Stream(server.grpc_url, f"{PARALLEL_MODEL}_stream")
    try:
        stream.send({**REQUEST, "preview": 3})
        progress, final = stream.until_final()
    finally:
        stream.close()
    previews = [(int(r.as_numpy("step")[0]), r.as_numpy("preview_frame")) for r in progress]
    previews = [(step, frame) for step, frame in previews if frame is not None]
    assert [step for step, _ in previews] == [3, 6], [step for step, _ in previews]
    frames = final.as_numpy("frames")
    assert all(frame.dtype == np.uint8 and frame.shape == (48, 80, 3) for _, frame in previews)
    # The last step's clean estimate, decoded, is close to the video's first frame (the last update is small).
    diff = np.abs(previews[-1][1].astype(np.int16) - frames[0].astype(np.int16))
    assert diff.mean() < 4.0, float(diff.mean())
    assert np.array_equal(frames, _frames(client))  # the unary endpoint's frames
