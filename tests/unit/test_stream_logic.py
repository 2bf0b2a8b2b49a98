"""Streaming, cancellation and deadlines as logic, without a server: the job board, the step guard, the request's
`timeout_s`, the scheduler's hooks on a real tiny denoiser (with a fake `triton_python_backend_utils`), the clean
estimate behind previews and the preview frames' size, and the client's stream errors. tests/server/test_stream.py
checks the same through the server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factories import load_deployment, make_request, validated_request
from fakes import pb_utils
from wan_triton.components import build_denoiser
from wan_triton.config.deployment import Deployment
from wan_triton.config.request import InvalidRequestError
from wan_triton.model.checkpoint import MAX_SEQUENCE_LENGTH, Checkpoint
from wan_triton.serving.stopping import DEADLINE_MESSAGE, JobBoard, RequestStopped, StepGuard
from wan_triton.serving.stream import PREVIEW_MAX_SIDE, shrink_frame

DEPLOYMENT = load_deployment("cpu")


def test_job_board_files_by_token_only(tmp_path):
    board = JobBoard(tmp_path / "jobs")
    token, other = board.new_token(), board.new_token()
    assert not board.is_cancelled(token) and board.progress(token) is None and board.take_preview(token) is None
    board.cancel(token)
    board.set_progress(token, 3, 10)
    latents = np.arange(2 * 4 * 1 * 3 * 5, dtype=np.float32).reshape(2, 4, 1, 3, 5)
    board.set_preview(token, 4, latents)
    assert board.is_cancelled(token) and not board.is_cancelled(other)
    assert (board.progress(token).step, board.progress(token).num_steps) == (3, 10)
    step, got = board.take_preview(token)
    assert step == 4 and np.array_equal(got, latents) and got.dtype == np.float32
    assert board.take_preview(token) is None  # taken once
    board.clear(token)
    assert not board.is_cancelled(token) and board.progress(token) is None
    assert not list((tmp_path / "jobs").iterdir())
    for bad in ("../../etc/passwd", "A" * 32, "0" * 31, "", "0" * 32 + "/x"):
        with pytest.raises(ValueError, match="32 lowercase hex"):
            board.cancel(bad)


def test_step_guard_cancel_and_deadline():
    now = [100.0]
    cancelled = [False]
    guard = StepGuard(2.0, 102.0, [lambda: cancelled[0]], clock=lambda: now[0])
    guard.check("after step 1 of 4")  # neither: goes on
    now[0] = 102.5
    with pytest.raises(RequestStopped, match=rf"^{DEADLINE_MESSAGE}: the request's 2 s passed after step 2") as info:
        guard.check("after step 2 of 4")
    assert info.value.reason == "deadline"
    cancelled[0] = True  # cancellation wins: the client is gone either way
    with pytest.raises(RequestStopped, match="request cancelled after step 3 of 4") as info:
        guard.check("after step 3 of 4")
    assert info.value.reason == "cancelled"
    StepGuard().check("anywhere")  # no deadline, no cancel source


def _validate(now=None, **inputs):
    return validated_request(DEPLOYMENT, now_unix_s=now, **inputs)


def test_timeout_s_sets_the_deadline_and_is_validated():
    req = _validate(now=1000.0, prompt="a cat", timeout_s=np.float32(2.5))
    assert (req.timeout_s, req.deadline_unix_s) == (2.5, 1002.5)
    assert _validate(prompt="a cat").deadline_unix_s is None  # cpu.yaml sets no default deadline
    limit = DEPLOYMENT.limits.max_timeout_s
    for bad in (0.0, -1.0, float("nan"), float("inf"), limit + 1):
        with pytest.raises(
            InvalidRequestError, match=rf"^timeout_s: must be a finite number of seconds in \(0, {limit:g}\]"
        ):
            _validate(prompt="a cat", timeout_s=np.float32(bad))


def test_default_timeout_must_be_within_the_limit():
    data = DEPLOYMENT.model_dump()
    data["defaults"]["timeout_s"] = data["limits"]["max_timeout_s"] * 2
    with pytest.raises(ValueError, match="default timeout_s"):
        Deployment.model_validate(data)


def test_preview_every_validation():
    from wan_triton.serving.stream import preview_every

    assert preview_every(None, 50) == 0
    assert preview_every(np.array([3], dtype=np.int64), 50) == 3
    for bad in (np.array([-1], dtype=np.int64), np.array([51], dtype=np.int64), np.array([1, 2]), np.array([1.5])):
        with pytest.raises(InvalidRequestError, match=r"^preview: must"):
            preview_every(bad, 50)


def test_preview_frames_are_small():
    frame = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    small = shrink_frame(frame)
    assert small.shape == (144, PREVIEW_MAX_SIDE, 3) and small.dtype == np.uint8
    assert abs(float(small.mean()) - float(frame.mean())) < 1.0  # an area average keeps the brightness


@pytest.mark.parametrize("size", [(720, 1280), (1280, 720), (257, 300), (480, 832), (1000, 999), (300, 2), (100, 100)])
def test_preview_frames_equal_torch_area_interpolation(size):
    """The numpy area average gives exactly the bytes of torch's `F.interpolate(mode="area")`."""
    frame = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    scale = PREVIEW_MAX_SIDE / max(size)
    if scale >= 1:
        expected = frame
    else:
        pixels = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
        area = torch.nn.functional.interpolate(
            pixels, size=(max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), mode="area"
        )
        expected = area[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(shrink_frame(frame), expected)


def test_clean_estimate_is_what_unipc_predicts():
    """x0 = latents - sigma x noise_pred is UniPC's own x0 prediction for flow matching, at every step."""
    import diffusers

    from wan_triton.model.denoise import clean_estimate

    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    scheduler.set_timesteps(5)
    scheduler.set_begin_index(0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 2, 3, 3, generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        noise_pred = torch.randn(latents.shape, generator=generator)
        x0 = clean_estimate(scheduler, i, latents, noise_pred)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        torch.testing.assert_close(x0, scheduler.model_outputs[-1])


# --- the scheduler step's hooks, on a real tiny denoiser, with the fake triton_python_backend_utils -------------


@pytest.fixture
def scheduler(fake_pb, other_checkpoint, tmp_path):
    deployment = load_deployment("cpu_torch")
    denoiser = build_denoiser(Checkpoint.open(other_checkpoint), deployment.components.denoiser, tmp_path)
    return pb_utils.scheduler_model(deployment, denoiser, JobBoard(tmp_path / "jobs"))


def _scheduler_request(model, token: str | None, preview_every: int = 0, **changes) -> dict:
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 2, MAX_SEQUENCE_LENGTH, model.denoiser.ckpt.text_dim, generator=generator)
    return pb_utils.scheduler_request(make_request(**changes), embeds.numpy(), token, preview_every)


def test_scheduler_reports_progress_and_previews_on_the_board(scheduler):
    token = scheduler.board.new_token()
    with_board, plain = scheduler.execute(
        [_scheduler_request(scheduler, token, preview_every=3), _scheduler_request(scheduler, None)]
    )
    assert with_board.error is None and plain.error is None
    # The board changes nothing in the result (both requests are the same but for it, and were batched together).
    latents = with_board.output_tensors[0].as_numpy()
    assert np.array_equal(latents, plain.output_tensors[0].as_numpy())
    assert (scheduler.board.progress(token).step, scheduler.board.progress(token).num_steps) == (6, 6)
    step, preview = scheduler.board.take_preview(token)  # the newest: after step 6 (3 and 6 were written)
    assert step == 6 and preview.shape == (1, latents.shape[1], 1, *latents.shape[3:])
    # After the last step the clean estimate is close to the final latents' first frame.
    assert np.abs(preview - latents[:, :, :1]).mean() < 0.1 * np.abs(latents).mean()


def test_scheduler_stops_a_cancelled_request_and_one_past_its_deadline(scheduler):
    token = scheduler.board.new_token()
    scheduler.board.cancel(token)
    late = _scheduler_request(scheduler, None, timeout_s=1.0, deadline_unix_s=1.0)  # long past
    ok = _scheduler_request(scheduler, None, seed=4)
    cancelled, past, fine = scheduler.execute([_scheduler_request(scheduler, token), late, ok])
    assert cancelled.error.code == "CANCELLED" and "request cancelled before denoising" in cancelled.error.message
    assert past.error.code == "CANCELLED" and past.error.message.startswith(DEADLINE_MESSAGE)
    assert fine.error is None
    # Cancelled mid-loop: the flag goes up after step 2; the request stops there and its batch-mate finishes.
    token = scheduler.board.new_token()
    original = scheduler.board.set_progress

    def cancel_after_two(tok, step, num_steps):
        original(tok, step, num_steps)
        if tok == token and step == 2:
            scheduler.board.cancel(tok)

    scheduler.board.set_progress = cancel_after_two
    stopped, mate = scheduler.execute([_scheduler_request(scheduler, token), _scheduler_request(scheduler, None)])
    assert stopped.error.code == "CANCELLED" and "after step 2 of 6" in stopped.error.message
    (alone,) = scheduler.execute([_scheduler_request(scheduler, None)])
    # The batch-mate ran all its steps undisturbed (batched and single forwards may round differently).
    assert mate.error is None
    np.testing.assert_allclose(mate.output_tensors[0].as_numpy(), alone.output_tensors[0].as_numpy(), atol=1e-5)


# --- the client ---------------------------------------------------------------------------------------------------


def test_client_maps_stream_errors_and_writes_previews(tmp_path):
    from tritonclient.utils import InferenceServerException

    from wan_client import EXIT_BUSY, EXIT_DEADLINE, EXIT_FAILURE, EXIT_INVALID_ARGUMENT, stream_error, write_ppm

    def code(message: str) -> int:
        return stream_error(InferenceServerException(msg=message)).exit_code

    assert code(f"[CANCELLED] {DEADLINE_MESSAGE}: the request's 2 s passed after step 4 of 50") == EXIT_DEADLINE
    assert code("[INVALID_ARG] height: must be a positive multiple of 16") == EXIT_INVALID_ARGUMENT
    assert code("[UNAVAILABLE] wan_t2v_scheduler: Exceeds maximum queue size") == EXIT_BUSY
    assert code("[INTERNAL] boom") == EXIT_FAILURE and code("no tag at all") == EXIT_FAILURE
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    write_ppm(tmp_path / "p.ppm", frame)
    assert (tmp_path / "p.ppm").read_bytes() == b"P6 3 2 255\n" + frame.tobytes()


def test_client_preview_options_need_stream():
    from wan_client import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--prompt", "x", "--preview-every", "2"])
    args = parse_args(["--prompt", "x", "--stream", "--preview-every", "2", "--timeout", "5"])
    assert args.stream and args.preview_every == 2
