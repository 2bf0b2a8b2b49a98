"""The worker group that serves a parallel plan: it lives across requests, returns rank 0's latents, and a worker
killed mid-request fails only that request (with a clear error) before the group is rebuilt for the next; a request
stopped mid-loop (cancelled, past its deadline) stops every rank after the same step and keeps the group."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from checks import logged_stops
from factories import make_embeds, make_request
from wan_triton.config.deployment import ComponentConfig
from wan_triton.config.plan import PlanError
from wan_triton.config.request import GenerationRequest, InvalidRequestError
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.serving.stopping import RequestStopped
from wan_triton.workers.supervisor import WorkerGroup, WorkerGroupError

# Ulysses: every layer of every step waits on the peer rank, so a dead peer would hang a naive supervisor.
CFG = ComponentConfig(engine="torch", parallel={"ulysses": 2})


def _request(steps: int) -> GenerationRequest:
    return make_request(width=64, num_inference_steps=steps)  # 16 tokens: 8 a rank


@pytest.fixture(scope="module")
def ckpt(tiny4_checkpoint):
    return Checkpoint.open(tiny4_checkpoint)


@pytest.fixture(scope="module")
def embeds(ckpt):
    return make_embeds(ckpt.text_dim)


@pytest.fixture(scope="module")
def group(ckpt):
    g = WorkerGroup(ckpt, CFG)
    g.start()
    yield g
    g.close()


def test_group_matches_one_process_and_survives_a_killed_worker(group, ckpt, embeds):
    from wan_triton.components import build_denoiser

    expected = build_denoiser(ckpt, ComponentConfig(engine="torch"), Path("/nonexistent"))(_request(3), embeds)
    first = group(_request(3), embeds)
    rel = float((first - expected).norm() / expected.norm())
    assert rel < 1e-5, rel
    pids = group.pids

    # A long request; kill rank 1 once rank 0 reports the first step.
    stepped, outcome = threading.Event(), {}

    def run():
        try:
            outcome["latents"] = group(_request(200), embeds, on_step=lambda i, n: stepped.set())
        except WorkerGroupError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    assert stepped.wait(timeout=120)
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the in-flight request hung on the dead worker"
    assert "latents" not in outcome
    message = str(outcome["error"])
    assert f"rank 1 (pid {pids[1]}) exited with code -9" in message and "restarted" in message, message
    assert not group.healthy()

    # The next request gets a fresh group and the same result as before.
    again = group(_request(3), embeds)
    assert group.healthy() and set(group.pids).isdisjoint(pids) and group.generation == 2 and group.restarts == 1
    assert torch.equal(again, first)


def test_group_sends_only_the_estimates_of_every_kth_step(group, ckpt, embeds):
    """A preview every 2 steps: rank 0 computes and sends the estimates after steps 2 and 4 only, the same as one
    process gives for them."""
    from wan_triton.components import build_denoiser

    one_process = build_denoiser(ckpt, ComponentConfig(engine="torch"), Path("/nonexistent"))
    expected, got = [], []
    one_process(_request(5), embeds, on_estimate=lambda i, x: expected.append((i, x[:, :, :1].clone())))
    group(_request(5), embeds, on_estimate=lambda i, x: got.append((i, x)), estimate_every=2)
    assert [i for i, _ in got] == [1, 3]
    for i, mine in got:
        theirs = expected[i][1]
        assert float((mine - theirs).norm() / theirs.norm()) < 1e-5
    seen = []
    one_process(_request(5), embeds, on_estimate=lambda i, x: seen.append(i), estimate_every=2)
    assert seen == [1, 3]


def test_group_sends_the_first_frame_of_each_clean_estimate_when_asked(group, ckpt, embeds):
    from wan_triton.components import build_denoiser

    one_process = build_denoiser(ckpt, ComponentConfig(engine="torch"), Path("/nonexistent"))
    expected, got = [], []
    one_process(_request(3), embeds, on_estimate=lambda i, x: expected.append((i, x[:, :, :1].clone())))
    group(_request(3), embeds, on_estimate=lambda i, x: got.append((i, x)))
    assert [i for i, _ in got] == [i for i, _ in expected] == [0, 1, 2]
    for (_, mine), (_, theirs) in zip(got, expected, strict=True):
        assert mine.shape == theirs.shape and mine.shape[2] == 1, (mine.shape, theirs.shape)
        rel = float((mine - theirs).norm() / theirs.norm())
        assert rel < 1e-5, rel


def test_a_stopped_request_stops_every_rank_and_keeps_the_group(group, embeds, caplog):
    # The scheduler's step hook raises RequestStopped when a request is cancelled or past its deadline. The ranks
    # cannot leave mid-step, but they agree after each step and all stop soon after, instead of running the
    # request's 200 steps; the same processes serve the next request.
    expected = group(_request(3), embeds)
    pids, generation = group.pids, group.generation

    def hook(index: int, count: int) -> None:
        if index >= 1:
            raise RequestStopped("cancelled", f"request cancelled after step {index + 1} of {count}")

    with (
        caplog.at_level(logging.INFO, logger="wan_triton.workers.supervisor"),
        pytest.raises(RequestStopped, match="cancelled after step 2 of 200"),
    ):
        group(_request(200), embeds, on_step=hook)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    stops = logged_stops(logged)
    assert len(stops) == 1, f"the ranks did not report stopping mid-loop: {logged}"
    # The ranks run on while the hook's answer travels back (on a loaded 2-core machine, several tiny steps).
    assert 2 <= stops[0] < 100, stops
    assert group.healthy() and group.pids == pids and group.generation == generation
    assert torch.equal(group(_request(3), embeds), expected)


def test_a_worker_killed_between_requests_costs_no_request(group, embeds):
    # Sent right after the kill, the request may find the killed worker still looking alive (its threads are not
    # all gone yet, so it is not reaped): the group sees it gone before anything ran, rebuilds and sends it again.
    expected = group(_request(2), embeds)
    for _ in range(3):
        pids = group.pids
        os.kill(pids[1], signal.SIGKILL)
        assert torch.equal(group(_request(2), embeds), expected)
        assert group.healthy() and set(group.pids).isdisjoint(pids)


def test_a_hung_worker_fails_the_request_after_the_stall_timeout(ckpt, embeds):
    # A stopped worker is alive but never answers: its peer waits in the first collective, and no rank reports
    # progress. Without the stall timeout the request (and the model instance) would wait forever.
    stall_s = 10.0
    hung = WorkerGroup(ckpt, CFG.model_copy(update={"worker_stall_timeout_s": stall_s}))
    hung.start()
    try:
        expected = hung(_request(2), embeds)
        pids = hung.pids
        os.kill(pids[1], signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(WorkerGroupError, match=rf"no progress from denoiser worker ranks \[0, 1\] for {stall_s} s"):
            hung(_request(2), embeds)
        assert stall_s <= time.monotonic() - started < stall_s + 30
        assert not hung.healthy()  # stopped (killed) as a whole

        # The next request gets a fresh group and the same result.
        assert torch.equal(hung(_request(2), embeds), expected)
        assert hung.healthy() and set(hung.pids).isdisjoint(pids)
    finally:
        hung.close()


def test_sequence_must_split_over_the_ulysses_ranks(group, embeds):
    # 48x48 pixels, 5 frames: 2 latent frames x 3 x 3 = 18 tokens is even; 16x48: 2 x 1 x 3 = 6 is even;
    # 16x16, 1 frame: 1 x 1 x 1 = 1 token cannot be split over 2 ranks.
    request = make_request(height=16, width=16, num_frames=1, num_inference_steps=1)
    with pytest.raises(InvalidRequestError, match="1 tokens .* over 2 sequence-parallel ranks"):
        group(request, embeds)
    assert group.healthy()  # rejected before any worker saw it


def test_plan_that_does_not_fit_the_checkpoint_is_refused(ckpt):
    with pytest.raises(PlanError, match="num_attention_heads 4 is not divisible by ulysses x tp = 8"):
        WorkerGroup(ckpt, ComponentConfig(engine="torch", parallel={"ulysses": 8}))
