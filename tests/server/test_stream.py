"""The streaming endpoint, cancellation and deadlines, against the real server (tests/conftest.py).

`<model>_stream` is a decoupled model beside the `<model>` ensemble: progress responses, then the video. A cancelled
stream stops the scheduler's loop within one step; `timeout_s` stops either endpoint at its deadline.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from factories import LONGEST_CPU, REPO_ROOT
from served import PROGRESS, STOP_WAIT_S, Stream, infer, metric_samples, metric_value
from wan_client import EXIT_DEADLINE, EXIT_OK, build_infer_inputs
from wan_triton.serving.stopping import JobBoard

CLIENT = (sys.executable, "-m", "wan_client")
MODEL = "wan_onnx"
STREAM = f"{MODEL}_stream"
REQUEST = dict(prompt="a paper boat on a stream", seed=77, height=64, width=96, num_frames=9, num_inference_steps=10)
# Long enough (about 0.3 s a step here) that a cancel or a deadline lands mid-loop.
LONG = dict(prompt="a long request", seed=5, **LONGEST_CPU)
# The same size as the client's options.
LONG_ARGS = (
    *("--height", str(LONG["height"]), "--width", str(LONG["width"])),
    *("--num-frames", str(LONG["num_frames"]), "--steps", str(LONG["num_inference_steps"])),
)


@pytest.fixture
def stream(server):
    s = Stream(server.grpc_url, STREAM)
    yield s
    s.close()


def _counter(server, name: str, **labels) -> float:
    return metric_value(metric_samples(server), name, **labels)


def _wait_for(server, name: str, at_least: float, **labels) -> None:
    deadline = time.monotonic() + STOP_WAIT_S
    while _counter(server, name, **labels) < at_least:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {at_least}"
        time.sleep(0.1)


def test_stream_reports_every_stage_and_previews_then_the_unary_video(client, stream):
    stream.send({**REQUEST, "preview": 5})
    progress, final = stream.until_final()
    stages = [r.as_numpy("stage")[0].decode() for r in progress]
    steps = [int(r.as_numpy("step")[0]) for r in progress]
    assert stages[0] == "text_encode" and stages[-2:] == ["vae_decode", "postprocess"], stages
    assert "denoise" in stages
    assert steps == sorted(steps) and steps[-1] == 10, steps
    assert all(int(r.as_numpy("num_steps")[0]) == 10 for r in progress)
    elapsed = [float(r.as_numpy("elapsed_s")[0]) for r in progress]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0

    # A preview every 5 steps; the one after the last step always arrives (relayed after the loop ends).
    previews = [(int(r.as_numpy("step")[0]), r.as_numpy("preview_frame")) for r in progress]
    previews = [(step, frame) for step, frame in previews if frame is not None]
    assert previews and previews[-1][0] == 10 and {s for s, _ in previews} <= {5, 10}, [s for s, _ in previews]
    frames = final.as_numpy("frames")
    assert frames.shape == (9, 64, 96, 3)
    for _, preview in previews:
        assert preview.dtype == np.uint8 and preview.shape == (64, 96, 3)  # already under PREVIEW_MAX_SIDE
    # The last step's clean estimate, decoded, is close to the video's first frame (the last solver update is small).
    diff = np.abs(previews[-1][1].astype(np.int16) - frames[0].astype(np.int16))
    assert diff.mean() < 4.0, float(diff.mean())

    # The final response is the unary endpoint's answer, bit for bit.
    unary = infer(client, MODEL, REQUEST)
    assert np.array_equal(frames, unary.as_numpy("frames"))
    assert bytes(final.as_numpy("video")[0]) == bytes(unary.as_numpy("video")[0])
    assert int(final.as_numpy("used_seed")[0]) == REQUEST["seed"]


def test_cancelled_stream_stops_the_loop_within_one_step(server):
    cancelled_before = _counter(server, "wan_requests_total", model=MODEL, stage="scheduler", outcome="cancelled")
    steps_before = _counter(server, "wan_denoise_steps_total", model=MODEL)
    board_before = set(JobBoard().root.glob("*"))
    stream = Stream(server.grpc_url, STREAM)
    stream.send(LONG, outputs=PROGRESS)
    step = 0
    while step < 2:
        result, error = stream.next()
        assert error is None, error
        step = int(result.as_numpy("step")[0])
    stream.close(cancel=True)
    _wait_for(server, "wan_requests_total", cancelled_before + 1, model=MODEL, stage="scheduler", outcome="cancelled")
    steps_run = _counter(server, "wan_denoise_steps_total", model=MODEL) - steps_before
    # It had reported `step` when the client cancelled; the scheduler stopped one or two steps later (the stream
    # model looks every 50 ms and the scheduler after every step), far from the 50 it was asked for. The margin
    # allows for a slow client on a busy machine.
    assert step <= steps_run <= step + 5, (step, steps_run)
    _wait_for(server, "wan_requests_total", 1, model=MODEL, stage="stream", outcome="cancelled")
    # The server goes on serving, and no request's board files are left behind.
    again = Stream(server.grpc_url, STREAM)
    again.send(REQUEST)
    _, final = again.until_final()
    again.close()
    assert final.as_numpy("frames").shape == (9, 64, 96, 3)
    left = set(JobBoard().root.glob("*")) - board_before
    assert not left, left


def test_a_client_that_disappears_mid_stream_stops_the_loop(server, tmp_path):
    cancelled_before = _counter(server, "wan_requests_total", model=MODEL, stage="scheduler", outcome="cancelled")
    steps_before = _counter(server, "wan_denoise_steps_total", model=MODEL)
    # The real client, killed (nothing on the wire but the closed connection) once it has shown step 10 (off a
    # terminal it prints a line every 10 steps).
    client = subprocess.Popen(
        [
            *(*CLIENT, "--url", server.grpc_url, "--model", MODEL, "--stream"),
            *("--prompt", LONG["prompt"], "--seed", "6", *LONG_ARGS, "--output", str(tmp_path / "never.mp4")),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in client.stderr:
            shown = re.search(r" step (\d+)/50 denoise", line)
            if shown and int(shown.group(1)) >= 10:
                break
        else:
            raise AssertionError("the client never showed step 10")
    finally:
        client.kill()
        client.wait()
    _wait_for(server, "wan_requests_total", cancelled_before + 1, model=MODEL, stage="scheduler", outcome="cancelled")
    assert _counter(server, "wan_denoise_steps_total", model=MODEL) - steps_before < 50
    assert not (tmp_path / "never.mp4").exists()


def test_unary_deadline_stops_the_loop_with_a_clear_error(server):
    steps_before = _counter(server, "wan_denoise_steps_total", model=MODEL)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, build_infer_inputs({**LONG, "timeout_s": 1.5}))
    assert caught.value.status() == "StatusCode.CANCELLED"
    assert "timeout_s: deadline exceeded" in caught.value.message() and "of 50" in caught.value.message()
    assert _counter(server, "wan_denoise_steps_total", model=MODEL) - steps_before < 50
    assert _counter(server, "wan_requests_total", model=MODEL, stage="scheduler", outcome="deadline") >= 1


def test_stream_deadline_and_bad_input_are_tagged_errors(server, stream):
    stream.send({**LONG, "timeout_s": 1.5})
    with pytest.raises(InferenceServerException, match=r"^\[CANCELLED\] timeout_s: deadline exceeded"):
        stream.until_final()
    for change, field in (({"height": 50}, "height"), ({"preview": -1}, "preview"), ({"timeout_s": 0.0}, "timeout_s")):
        stream.send({**REQUEST, **change})
        with pytest.raises(InferenceServerException, match=rf"^\[INVALID_ARG\] {field}: "):
            stream.until_final()
    _wait_for(server, "wan_requests_total", 1, model=MODEL, stage="stream", outcome="deadline")
    # The same stream still serves a good request.
    stream.send(REQUEST, outputs=("video", *PROGRESS))
    _, final = stream.until_final()
    assert len(bytes(final.as_numpy("video")[0])) > 0


def test_unary_timeout_is_validated(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, build_infer_inputs({**REQUEST, "timeout_s": -1.0}))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "timeout_s" in caught.value.message()


def _run_client(server, *args: str) -> subprocess.CompletedProcess:
    """The command-line client against the session's server's MODEL, to its end."""
    command = [*CLIENT, "--url", server.grpc_url, "--model", MODEL, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=STOP_WAIT_S)


def test_client_streams_with_previews_and_exits_4_at_its_deadline(server, tmp_path):
    done = _run_client(
        server,
        "--stream",
        *("--prompt", "a paper boat", "--seed", "3", "--height", "64", "--width", "96", "--num-frames", "9"),
        *("--steps", "6", "--preview-every", "3", "--preview-dir", str(tmp_path / "previews")),
        *("--output", str(tmp_path / "boat.mp4")),
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert "step 6/6" in done.stderr and done.stdout.strip().endswith("boat.mp4")
    assert ", seed 3 " in done.stderr or ", seed 3\n" in done.stderr
    previews = sorted((tmp_path / "previews").glob("*.ppm"))
    assert previews and previews[-1].name == "preview_step006.ppm"
    assert previews[-1].read_bytes().startswith(b"P6 96 64 255\n")
    late = _run_client(
        server, "--stream", "--prompt", "late", *LONG_ARGS, "--timeout", "1.5", "--output", str(tmp_path / "late.mp4")
    )
    assert late.returncode == EXIT_DEADLINE, late.stderr
    assert "deadline exceeded" in late.stderr and not (tmp_path / "late.mp4").exists()


def test_client_prints_the_random_seed_that_reproduces_its_video(server, tmp_path):
    """A request without --seed gets a seed drawn by the server; the client prints it, and the same request with
    that seed gives the same frames."""

    def run(name: str, *seed: str) -> tuple[str, np.ndarray]:
        done = _run_client(
            server,
            *("--prompt", "a kite", "--height", "64", "--width", "96", "--num-frames", "9", "--steps", "3", *seed),
            *("--output", str(tmp_path / f"{name}.mp4"), "--frames-npy", str(tmp_path / f"{name}.npy")),
        )
        assert done.returncode == EXIT_OK, done.stderr
        return done.stderr, np.load(tmp_path / f"{name}.npy")

    log, drawn = run("drawn")
    printed = re.search(r", seed (\d+)", log)
    assert printed, log
    _, again = run("again", "--seed", printed.group(1))
    np.testing.assert_array_equal(again, drawn)
    _, other = run("other", "--seed", str(int(printed.group(1)) + 1))
    assert not np.array_equal(other, drawn)  # the seed really chose the noise


def test_concurrent_streams_keep_the_server_alive(server):
    """Four clients streaming short, invalid and cancelled requests for 20 s: every answer is the expected one and
    the server is live after. Before the stub serialised its metric calls (wan_triton.serving.metrics), this load
    killed the server within 2-15 s in every run."""
    stress = REPO_ROOT / "benchmarks" / "stream_stress.py"
    run = subprocess.run(
        [sys.executable, str(stress), "--url", server.grpc_url, "--model", MODEL, "--duration-s", "20"],
        capture_output=True,
        text=True,
        timeout=STOP_WAIT_S,
    )
    assert run.returncode == 0, run.stderr[-3000:] + server.log_tail()
    assert "server live" in run.stderr
    assert server.process.poll() is None
