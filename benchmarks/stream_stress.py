"""Hammer a `<model>_stream` endpoint from several clients at once and check the server lives through it: the
reproduction of the Python-backend crash under concurrent streams (benchmarks/RESULTS.md).

Each client keeps its own gRPC stream and sends, in turn (`--kinds`), a short valid request (`good`: must end in
its video), a request with a bad height (`bad`: must be refused with INVALID_ARG naming `height`), a long request
it cancels after the first progress response (`cancel`), and, when asked, a long request it cancels once a denoising
step is reported (`cancel_loop`: stops the scheduler's loop, or a worker group's ranks, mid-loop). With `--url` it
loads a running server; without, it builds a deployment (`--deployment`, default cpu.yaml) of the tiny checkpoint,
starts a server, and at the end also requires a clean exit.

Exits 0 when every answer was the expected one and the server is live (and, when started here, exited 0); 1 when
the server died, a request got a wrong answer, or a client raised.

    python benchmarks/stream_stress.py --duration-s 300 --clients 4
    python benchmarks/stream_stress.py --url localhost:8001 --model wan_t2v --duration-s 20
    python benchmarks/stream_stress.py --deployment model_repository/deployments/cpu_parallel.yaml \
        --kinds good,bad,cancel,cancel_loop        # worker groups, cancelled mid-loop
"""

from __future__ import annotations

import argparse
import logging
import queue
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import tritonclient.grpc as grpcclient

from wan_bench.deployments import render
from wan_client import build_infer_inputs

_REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("stream_stress")

GOOD = dict(
    prompt="a small robot dances in the rain", seed=11, height=32, width=48, num_frames=5, num_inference_steps=2
)
BAD = {**GOOD, "height": 50}  # not a multiple of 16
LONG = {**GOOD, "height": 128, "width": 128, "num_frames": 17, "num_inference_steps": 30}
REQUESTS = {"good": GOOD, "bad": BAD, "cancel": LONG, "cancel_loop": LONG}
# How long one answer may take before the client counts the request as lost.
ANSWER_TIMEOUT_S = 60.0


def one_request(url: str, model: str, kind: str) -> str:
    """Send one request of `kind` on a fresh stream; its outcome: "<kind>:expected" or what went wrong."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(f"{model}_stream", build_infer_inputs(REQUESTS[kind]))
        while True:
            result, error = responses.get(timeout=ANSWER_TIMEOUT_S)
            if kind == "cancel":  # the first answer is a progress response; cancel the rest
                client.stop_stream(cancel_requests=True)
                return f"{kind}:{'expected' if error is None else 'error'}"
            if kind == "cancel_loop":  # progress responses until a denoising step; then cancel the rest
                if error is not None or result.as_numpy("stage")[0] == b"done":
                    return f"{kind}:{'error' if error is not None else 'finished before a step was reported'}"
                if result.as_numpy("stage")[0] == b"denoise":
                    client.stop_stream(cancel_requests=True)
                    return f"{kind}:expected"
                continue
            if kind == "bad":
                refused = error is not None and "[INVALID_ARG]" in str(error) and "height" in str(error)
                return f"{kind}:{'expected' if refused else 'not refused'}"
            if error is not None:
                return f"{kind}:error"
            if result.as_numpy("stage")[0] == b"done":
                return f"{kind}:{'expected' if result.as_numpy('video') is not None else 'no video'}"
    except Exception as exc:  # noqa: BLE001 - counted; a dead server shows up as these
        return f"{kind}:raised {type(exc).__name__}"
    finally:
        client.stop_stream()
        client.close()


def load(url: str, model: str, kinds: list[str], num_clients: int, duration_s: float, still_up) -> Counter:
    """`num_clients` threads sending `kinds` in turn for `duration_s` or until `still_up()` is False."""
    counts: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(first: int) -> None:
        turn = first
        while not stop.is_set():
            outcome = one_request(url, model, kinds[turn % len(kinds)])
            turn += 1
            with lock:
                counts[outcome] += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(num_clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline and still_up():
        time.sleep(1.0)
        with lock:
            logger.info("%s", dict(sorted(counts.items())))
    stop.set()
    for t in threads:
        t.join(ANSWER_TIMEOUT_S + 30)
    return counts


def verdict(counts: Counter, live: bool) -> int:
    wrong = {k: v for k, v in counts.items() if not k.endswith(":expected")}
    logger.info("answers: %s; server %s", dict(sorted(counts.items())), "live" if live else "DEAD")
    if wrong:
        logger.error("unexpected answers: %s", wrong)
    return 0 if live and not wrong and counts else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="gRPC host:port of a running server (default: start one)")
    parser.add_argument("--model", default="wan_t2v", help="deployment model name (the stream is <model>_stream)")
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--kinds", default="good,bad,cancel", help="what each client sends in turn (comma-separated)")
    parser.add_argument("--root", type=Path, default=None, help="work folder when starting a server (default: temp)")
    parser.add_argument(
        "--deployment",
        type=Path,
        default=_REPO / "model_repository/deployments/cpu.yaml",
        help="deployment to build and serve when starting a server (its model_name must be --model)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(REQUESTS):
        parser.error(f"--kinds: unknown {sorted(unknown)}; allowed: {sorted(REQUESTS)}")

    if args.url:
        probe = grpcclient.InferenceServerClient(args.url)

        def live() -> bool:
            try:
                return probe.is_server_live()
            except Exception:  # noqa: BLE001 - a refused connection is a dead server
                return False

        counts = load(args.url, args.model, kinds, args.clients, args.duration_s, live)
        return verdict(counts, live())

    from wan_triton.tritonserver.launch import running_server

    root = args.root or Path(tempfile.mkdtemp(prefix="stream_stress_"))
    # The deployment with the tiny checkpoint (`make build`'s default model).
    repo = render("tiny", args.deployment, root / "repo", root / "artifacts")
    with running_server([repo], root / "tritonserver.log") as server:
        counts = load(server.grpc_url, args.model, kinds, args.clients, args.duration_s, server.is_ready)
        live = server.process.poll() is None
        if not live:
            logger.error("server died (exit %s); log tail:\n%s", server.process.returncode, server.log_tail(60))
    code = verdict(counts, live)
    if live and server.process.returncode != 0:
        logger.error("server exited %s at shutdown:\n%s", server.process.returncode, server.shutdown_report())
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
