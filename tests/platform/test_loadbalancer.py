"""Replicas of the tiny model behind HAProxy (model_repository/platform/loadbalancer): balanced unary and streamed
requests with the same frames from either replica, failover when a replica dies, no traffic to a replica that is
not ready, and health checks that pass on a readiness port that speaks only HTTP/1.1.

Every replica is a real Triton server (wan_triton.tritonserver.launch) of one repository built once; the balancer
is a real HAProxy running the shipped template as rendered by its render.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from checks import assert_no_crash_in_log
from factories import REPO_ROOT
from replicas import MODEL, start_replicas, success_count
from served import Stream, infer
from wan_client import GenerateError, generate
from wan_client.client import STREAM_SUFFIX

STREAM = MODEL + STREAM_SUFFIX
MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
# Small and quick: a second or two each on the CPU.
REQUEST = dict(prompt="a lighthouse in a storm", height=32, width=32, num_frames=5, num_inference_steps=3)
DEADLINE_S = 120.0
# Where the failover figures go when this variable names a folder (benchmarks/RESULTS.md, "Failover").
RESULTS_ENV = "WAN_FAILOVER_RESULTS"


@pytest.fixture(scope="module")
def pair(tiny_repo, tmp_path_factory):
    """Two replicas of the tiny model."""
    replicas = start_replicas(tiny_repo, tmp_path_factory.mktemp("pair"), 2)
    yield replicas
    for replica in replicas:
        assert replica.stop() == 0, replica.shutdown_report()
        assert_no_crash_in_log(replica.log_path)


def _ports(replica) -> tuple[int, int]:
    return replica.grpc_port, replica.http_port


def test_health_checks_pass_on_an_http1_only_readiness_port(balancer_factory):
    """The shipped configuration's checks speak HTTP/1.1 to the replica's HTTP port, which (like Triton's) knows no
    HTTP/2: a check that spoke HTTP/2 there would never pass, and HAProxy 2.6, which counts a server as up before
    its first check, would only notice at `timeout check`."""
    seen: list[tuple[str, str]] = []

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.request_version, self.path))
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Ready) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        try:
            balancer = balancer_factory([(port, port)])
            balancer.wait_checked("replica1", timeout_s=10)
        finally:
            server.shutdown()
    assert seen and all(version.startswith("HTTP/1.") and path == "/v2/health/ready" for version, path in seen), seen


def test_unary_and_streamed_requests_spread_over_both_replicas_with_the_same_frames(pair, balancer_factory):
    balancer = balancer_factory([_ports(r) for r in pair])
    balancer.wait_checked("replica1")
    balancer.wait_checked("replica2")
    before = {(n, m): success_count(r, m) for n, r in enumerate(pair) for m in (MODEL, STREAM)}
    seeds = [100 + n % 8 for n in range(40)]

    def unary(seed: int) -> bytes:
        with grpcclient.InferenceServerClient(balancer.url) as client:
            return infer(client, MODEL, {**REQUEST, "seed": seed}, outputs=("frames",)).as_numpy("frames").tobytes()

    with ThreadPoolExecutor(4) as pool:
        frames = list(pool.map(unary, seeds))
    streamed = {}
    for seed in range(100, 108):
        stream = Stream(balancer.url, STREAM)
        stream.send({**REQUEST, "seed": seed})
        _, final = stream.until_final()
        stream.close()
        streamed[seed] = final.as_numpy("frames").tobytes()

    served = {(n, m): success_count(r, m) - before[n, m] for n, r in enumerate(pair) for m in (MODEL, STREAM)}
    assert served[0, MODEL] + served[1, MODEL] == 40, served
    assert served[0, STREAM] + served[1, STREAM] == 8, served
    assert all(count > 0 for count in served.values()), served
    # The frames of a (request, seed) are the same bytes whichever replica served it: each replica asked directly,
    # every balanced answer, and the streamed one.
    for seed in sorted(set(seeds)):
        direct = []
        for replica in pair:
            with grpcclient.InferenceServerClient(replica.grpc_url) as client:
                direct.append(infer(client, MODEL, {**REQUEST, "seed": seed}, outputs=("frames",)))
        expected = direct[0].as_numpy("frames").tobytes()
        assert direct[1].as_numpy("frames").tobytes() == expected, seed
        assert {f for s, f in zip(seeds, frames, strict=True) if s == seed} == {expected}, seed
        assert streamed[seed] == expected, seed
    # Not every seed gives the same video: the comparison above can fail.
    assert len({f for f in frames}) == 8


def test_concurrent_calls_over_one_client_connection_all_end_with_their_grpc_status(pair, balancer_factory):
    """Many calls at once over one client connection, as a busy client sends them. Each ends with its gRPC status
    and HAProxy logs each as ended normally: an HAProxy that multiplexed them over one connection to a replica
    could fail that connection (docs/deploying.md, `max-reuse 0`), and its calls would end without their status."""
    balancer = balancer_factory([_ports(r) for r in pair])
    balancer.wait_checked("replica1")
    balancer.wait_checked("replica2")
    calls = 200
    with grpcclient.InferenceServerClient(balancer.url) as client:

        def unary(seed: int) -> str | None:
            try:
                # Frames: a response of a few HTTP/2 frames of data before its trailers.
                infer(client, MODEL, {**REQUEST, "num_inference_steps": 1, "seed": seed}, outputs=("frames",))
            except InferenceServerException as error:
                return str(error)
            return None

        with ThreadPoolExecutor(8) as pool:
            errors = [e for e in pool.map(unary, range(calls)) if e is not None]

    def logged_calls() -> list[dict[str, str]]:
        return [r for r in balancer.requests() if r["request"].endswith(f"/{MODEL_INFER} HTTP/2.0")]

    # HAProxy writes a request's line as it closes the stream, which may be just after the client has its answer.
    deadline = time.monotonic() + 10
    while len(logged := logged_calls()) < calls and time.monotonic() < deadline:
        time.sleep(0.05)
    abnormal = [r for r in logged if r["termination"] != "----" or r["status"] != "200"]
    assert not errors and not abnormal, (errors, abnormal, balancer.log_text()[-4000:])
    assert len(logged) == calls, len(logged)
    assert {r["replica"] for r in logged} == {"replica1", "replica2"}


def test_a_replica_killed_under_load_fails_only_its_requests_and_retries_complete_them(
    pair, tiny_repo, balancer_factory, tmp_path
):
    (victim,) = start_replicas(tiny_repo, tmp_path, 1)
    balancer = balancer_factory([_ports(pair[0]), _ports(victim)])
    balancer.wait_checked("replica1")
    balancer.wait_checked("replica2")
    victim_before = success_count(victim, MODEL)
    outcomes: list[dict] = [{} for _ in range(30)]
    finished = threading.Semaphore(0)

    def one(n: int) -> None:
        failures: list[str] = []
        started = time.monotonic()
        try:
            result = generate(
                balancer.url,
                MODEL,
                {**REQUEST, "seed": 500 + n},
                want_frames=False,
                timeout_s=DEADLINE_S,
                retries=3,
                on_retry=lambda _attempt, error: failures.append(str(error)),
            )
            outcomes[n] = dict(ok=True, bytes=len(result.video), failures=failures)
        except GenerateError as error:
            outcomes[n] = dict(ok=False, error=str(error), failures=failures)
        outcomes[n]["elapsed_s"] = time.monotonic() - started
        finished.release()

    with ThreadPoolExecutor(6) as pool:
        for n in range(30):
            pool.submit(one, n)
        for _ in range(8):  # the load is under way, and the victim is serving its share
            assert finished.acquire(timeout=DEADLINE_S)
        victim_served = success_count(victim, MODEL) - victim_before
        killed_at = time.monotonic()
        # tritonserver and its stubs; its launcher stays, sees it die and removes its shared memory.
        os.killpg(_server_group(victim), signal.SIGKILL)
        ejected_at = balancer.wait_state("replica2", "DOWN")
    victim.process.wait()
    failures = [f for o in outcomes for f in o["failures"]]
    figures = dict(
        requests=30,
        replicas=2,
        succeeded=sum(o["ok"] for o in outcomes),
        failed_attempts_before_retry=len(failures),
        requests_retried=sum(bool(o["failures"]) for o in outcomes),
        victim_served_before_kill=victim_served,
        eject_s=round(ejected_at - killed_at, 3),
        health_check_interval_ms=500,
        max_request_s=round(max(o["elapsed_s"] for o in outcomes), 2),
        # The baseline of the same run: requests that were not retried.
        median_unretried_request_s=round(float(np.median([o["elapsed_s"] for o in outcomes if not o["failures"]])), 2),
        median_retried_request_s=(
            round(float(np.median([o["elapsed_s"] for o in outcomes if o["failures"]])), 2) if failures else None
        ),
        failure_messages=sorted(set(failures)),
    )
    print(json.dumps(figures, indent=1))
    if os.environ.get(RESULTS_ENV):
        out = REPO_ROOT / os.environ[RESULTS_ENV]
        out.mkdir(parents=True, exist_ok=True)
        (out / "failover.json").write_text(json.dumps(figures, indent=1) + "\n")
    # Nothing lost: every request returned its video (each retry reached the replica left); none hung.
    assert all(o["ok"] for o in outcomes), [o for o in outcomes if not o["ok"]]
    assert all(o["bytes"] > 0 for o in outcomes)
    assert figures["max_request_s"] < DEADLINE_S
    # Failures are clear gRPC errors of a lost replica, and only those were retried.
    assert all("UNAVAILABLE" in f or "lost the" in f or "cannot reach" in f for f in failures), failures
    # The balancer stops sending to it within a few of its health checks.
    assert figures["eject_s"] < 10, figures


def _server_group(replica) -> int:
    """The process group of the tritonserver a launcher started (its child, in a session of its own)."""
    children = subprocess.run(
        ["pgrep", "-P", str(replica.process.pid)], capture_output=True, text=True, check=True
    ).stdout.split()
    return os.getpgid(int(children[0]))


def test_a_replica_that_is_not_ready_gets_no_traffic(pair, tiny_repo, balancer_factory, tmp_path):
    from wan_triton.tritonserver.launch import free_port, server_ready, start_server

    ports = (free_port(), free_port(), free_port())
    balancer = balancer_factory([_ports(pair[0]), (ports[1], ports[0])])
    balancer.wait_checked("replica1")
    # HAProxy 2.6 starts with every server up until its checks fail; a long-running balancer has long marked a
    # stopped replica down.
    balancer.wait_state("replica2", "DOWN")
    late_box: list = []
    starter = threading.Thread(
        target=lambda: late_box.append(start_server([tiny_repo], tmp_path / "late.log", 600, ports=ports))
    )
    starter.start()
    # Requests answered while HAProxy had the late replica down before and after each one, and whether one request
    # overlapped its change to up (then it may have gone to the late replica, which was ready by then).
    sent, overlapped = 0, 0
    try:
        with grpcclient.InferenceServerClient(balancer.url) as client:
            while starter.is_alive():
                # While it loads and warms up, it is listed but down: every request goes to the ready replica,
                # whose checks keep passing.
                before = balancer.states()
                assert before["replica1"] == "UP", balancer.log_text()
                if before["replica2"] != "DOWN":
                    # It passed a check before start_server saw it ready (nothing was sent since it did).
                    assert server_ready(ports[0])
                    break
                infer(client, MODEL, {**REQUEST, "seed": 900 + sent}, outputs=("used_seed",))
                after = balancer.states()
                assert after["replica1"] == "UP", balancer.log_text()
                if after["replica2"] != "DOWN":
                    # It passed a check before start_server saw it ready: only a ready Triton answers one.
                    assert server_ready(ports[0])
                    overlapped = 1
                    break
                sent += 1
                # Back-to-back requests would hold both cores and slow the late replica's load several-fold.
                time.sleep(0.25)
    except BaseException:
        starter.join()
        for late in late_box:
            late.stop()
        raise
    starter.join()
    (late,) = late_box
    try:
        assert sent >= 3, sent
        assert success_count(late, MODEL) <= overlapped, (sent, overlapped)
        balancer.wait_checked("replica2")
        with grpcclient.InferenceServerClient(balancer.url) as client:
            for n in range(6):
                infer(client, MODEL, {**REQUEST, "seed": 950 + n}, outputs=("used_seed",))
        assert success_count(late, MODEL) > 0
        assert balancer.checks()["replica1"].removeprefix("* ") == "L7OK", balancer.log_text()
    finally:
        assert late.stop() == 0, late.shutdown_report()
        assert_no_crash_in_log(late.log_path)
