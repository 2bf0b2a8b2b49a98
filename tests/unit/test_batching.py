"""Request batching without a server: the grouping, `Denoiser.run_batch` against one request at a time, the
scheduler step's `execute` against a fake `triton_python_backend_utils`, and the serving settings' validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from factories import load_deployment, make_request
from fakes import pb_utils
from wan_build.render import dynamic_batching, render_repository
from wan_triton.components import build_denoiser
from wan_triton.config.deployment import Deployment, Serving
from wan_triton.config.request import GenerationRequest
from wan_triton.model.checkpoint import MAX_SEQUENCE_LENGTH, Checkpoint
from wan_triton.model.denoise import BatchItem, group_by_shape
from wan_triton.serving.stopping import JobBoard

# --- grouping -------------------------------------------------------------------------------------------------


def test_groups_by_shape_in_arrival_order_and_caps_the_batch():
    requests = [
        make_request(seed=0),
        make_request(height=64, seed=1),
        make_request(seed=2),
        make_request(guidance_scale=1.0, seed=3),  # guidance off: one row per request, its own group
        make_request(seed=4, guidance_scale=7.0),  # other scales share the forward
        make_request(num_inference_steps=5, seed=5),
        make_request(seed=6),
    ]
    assert group_by_shape(requests, max_batch_size=8) == [[0, 2, 4, 6], [1], [3], [5]]
    assert group_by_shape(requests, max_batch_size=3) == [[0, 2, 4], [1], [3], [5], [6]]
    assert group_by_shape(requests, max_batch_size=1) == [[n] for n in range(len(requests))]
    assert group_by_shape([], max_batch_size=4) == []


def test_requests_with_an_image_batch_only_with_each_other():
    """Image-to-video and text-to-video requests of one shape differ in their inputs: never in one batch; two with
    images (different ones) of the same shape share one."""
    requests = [
        make_request(seed=0, has_image=True),
        make_request(seed=1),
        make_request(seed=2, has_image=True),
        make_request(seed=3),
        make_request(seed=4, height=64, has_image=True),
    ]
    assert group_by_shape(requests, max_batch_size=8) == [[0, 2], [1, 3], [4]]


# --- the batched loop against one request at a time -------------------------------------------------------------


@pytest.fixture(scope="module")
def denoiser(other_checkpoint):
    deployment = load_deployment("cpu_torch")
    ckpt = Checkpoint.open(other_checkpoint)
    return build_denoiser(ckpt, deployment.components.denoiser, Path("/nonexistent"))


def _embeds(ckpt: Checkpoint, rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(rows, MAX_SEQUENCE_LENGTH, ckpt.text_dim, generator=generator)


# Batched and single forwards may take different GEMM paths: the same maths, not always the same rounding.
LATENT_ATOL = 1e-5


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["guidance", "no-guidance"])
def test_batch_equals_each_request_alone(denoiser, guidance):
    # 8 steps cross the expert boundary at flow shift 5, so both experts and both guidance scales are used.
    requests = [
        make_request(
            seed=s, guidance_scale=guidance + s * (guidance > 1), guidance_scale_2=1.5 + s, num_inference_steps=8
        )
        for s in range(3)
    ]
    rows = 2 if guidance > 1 else 1
    items = [BatchItem(r, _embeds(denoiser.ckpt, rows, seed=10 + n)) for n, r in enumerate(requests)]
    batched = denoiser.run_batch(items)
    for item, got in zip(items, batched, strict=True):
        alone = denoiser(item.request, item.prompt_embeds)
        assert got.shape == alone.shape == (1, denoiser.ckpt.latent_channels, 2, 4, 6)
        torch.testing.assert_close(got, alone, atol=LATENT_ATOL, rtol=0)
    # Different seeds and scales gave different latents: the rows were not mixed up or shared.
    assert not torch.allclose(batched[0], batched[1])


def test_a_request_whose_step_hook_raises_leaves_the_batch(denoiser):
    class Cancelled(Exception):
        pass

    calls: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def hook(n: int, stop_at: int | None = None):
        def on_step(step: int, num_steps: int) -> None:
            calls[n].append(step)
            if step == stop_at:
                raise Cancelled(f"request {n} cancelled at step {step}")

        return on_step

    requests = [make_request(seed=s) for s in range(3)]
    items = [
        BatchItem(requests[0], _embeds(denoiser.ckpt, 2, 0), hook(0)),
        BatchItem(requests[1], _embeds(denoiser.ckpt, 2, 1), hook(1, stop_at=2)),
        BatchItem(requests[2], _embeds(denoiser.ckpt, 2, 2), hook(2)),
    ]
    results = denoiser.run_batch(items)
    assert isinstance(results[1], Cancelled) and "step 2" in str(results[1])
    assert calls[1] == [0, 1, 2]  # dropped after the step that raised
    assert calls[0] == calls[2] == list(range(6))
    for n in (0, 2):
        torch.testing.assert_close(
            results[n], denoiser(items[n].request, items[n].prompt_embeds), atol=LATENT_ATOL, rtol=0
        )
    # Alone, the hook's exception still propagates as before.
    with pytest.raises(Cancelled):
        denoiser(requests[1], items[1].prompt_embeds, hook(1, stop_at=0))


def test_run_batch_refuses_mixed_shapes(denoiser):
    items = [
        BatchItem(make_request(), _embeds(denoiser.ckpt, 2, 0)),
        BatchItem(make_request(height=64), _embeds(denoiser.ckpt, 2, 0)),
    ]
    with pytest.raises(ValueError, match="one shape"):
        denoiser.run_batch(items)


# --- the scheduler step's execute, with the fake triton_python_backend_utils (tests/fakes/pb_utils.py) --------


class _RecordingDenoiser:
    """Records every batch it runs; fails any batch holding `poison_seed` (as a broken input would)."""

    def __init__(self, poison_seed: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.poison_seed = poison_seed

    def run_batch(self, items):
        self.batches.append([item.request.seed for item in items])
        if any(item.request.seed == self.poison_seed for item in items):
            raise RuntimeError("engine failed")
        return [torch.full((1, 4, 1, 2, 2), float(item.request.seed)) for item in items]


def _scheduler(denoiser, max_batch_size: int):
    deployment = load_deployment("cpu").model_copy(update={"serving": Serving(max_batch_size=max_batch_size)})
    return pb_utils.scheduler_model(deployment, denoiser, JobBoard())


def _triton_request(request: GenerationRequest, rows: int = 2) -> dict:
    return pb_utils.scheduler_request(request, np.zeros((1, rows, MAX_SEQUENCE_LENGTH, 4), np.float32))


def _seed_of(response) -> int:
    (tensor,) = response.output_tensors
    return int(tensor.as_numpy().reshape(-1)[0])


def test_execute_batches_same_shapes_and_answers_every_request(fake_pb):
    denoiser = _RecordingDenoiser()
    model = _scheduler(denoiser, max_batch_size=2)
    requests = [
        _triton_request(make_request(seed=0)),
        _triton_request(make_request(seed=1, height=64)),
        _triton_request(make_request(seed=2)),
        {"request": pb_utils.Tensor("request", np.array([[b"not json"]], dtype=object))},
        _triton_request(make_request(seed=4)),
        _triton_request(make_request(seed=5, guidance_scale=1.0), rows=1),
    ]
    responses = model.execute(requests)
    assert denoiser.batches == [[0, 2], [1], [4], [5]]
    assert [r.error is None for r in responses] == [True, True, True, False, True, True]
    assert [_seed_of(r) for n, r in enumerate(responses) if n != 3] == [0, 1, 2, 4, 5]
    assert responses[3].error.code == "INTERNAL"


def test_a_failing_batch_is_retried_one_request_at_a_time(fake_pb):
    denoiser = _RecordingDenoiser(poison_seed=1)
    model = _scheduler(denoiser, max_batch_size=4)
    responses = model.execute([_triton_request(make_request(seed=s)) for s in range(3)])
    assert denoiser.batches == [[0, 1, 2], [0], [1], [2]]
    assert responses[1].error is not None and "engine failed" in responses[1].error.message
    assert _seed_of(responses[0]) == 0 and _seed_of(responses[2]) == 2


def test_execute_hands_each_request_its_image_and_batches_images_apart(fake_pb):
    seen = {}

    class _Recording(_RecordingDenoiser):
        def run_batch(self, items):
            seen.update({item.request.seed: item.condition_image for item in items})
            return super().run_batch(items)

    denoiser = _Recording()
    model = _scheduler(denoiser, max_batch_size=4)
    request = make_request(seed=0, has_image=True)
    image = np.random.default_rng(0).integers(0, 256, (request.height, request.width, 3), dtype=np.uint8)
    responses = model.execute(
        [
            pb_utils.scheduler_request(
                request, np.zeros((1, 2, MAX_SEQUENCE_LENGTH, 4), np.float32), condition_image=image
            ),
            _triton_request(make_request(seed=1)),
            _triton_request(make_request(seed=2, has_image=True)),
            # An image of another size than the request's is an internal error, answered for that request alone.
            pb_utils.scheduler_request(
                make_request(seed=3, has_image=True),
                np.zeros((1, 2, MAX_SEQUENCE_LENGTH, 4), np.float32),
                condition_image=image[:16],
            ),
        ]
    )
    assert denoiser.batches == [[0, 2], [1]]
    assert np.array_equal(seen[0], image) and seen[1] is None and seen[2].shape == image.shape
    assert [r.error is None for r in responses] == [True, True, True, False]
    assert "does not match the request" in responses[3].error.message


# --- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "serving, field",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 65}, "max_batch_size"),
        ({"max_queue_size": 0}, "max_queue_size"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
        ({"max_queue": 4}, "max_queue"),  # a typo is an error, not ignored
        ({"cuda_memory_pool_mib": 16}, "cuda_memory_pool_mib"),  # below Triton's own default
        ({"model_thread_nice": -1}, "model_thread_nice"),  # above the server's priority: needs privileges
        ({"model_thread_nice": 20}, "model_thread_nice"),  # beyond Linux's lowest priority, 19
    ],
)
def test_bad_serving_settings_are_rejected(serving, field):
    data = load_deployment("cpu").model_dump()
    with pytest.raises(ValidationError, match=rf"serving\.{field}\b"):
        Deployment.model_validate({**data, "serving": serving})


def test_serving_settings_render_as_triton_dynamic_batching(tmp_path):
    assert "max_queue_size" not in dynamic_batching(Serving())  # default: unbounded, no delay
    block = dynamic_batching(Serving(max_batch_size=4, max_queue_size=3, max_queue_delay_ms=2.5))
    assert "max_queue_delay_microseconds: 2500" in block
    assert "default_queue_policy { max_queue_size: 3 }" in block
    # Only the scheduler batches; every other step keeps max_batch_size 0 and Triton's default scheduler.
    deployment = load_deployment("cpu_torch")
    deployment = deployment.model_copy(update={"serving": Serving(max_batch_size=4, max_queue_size=3)})
    repo = render_repository(deployment, tmp_path, tmp_path, tmp_path / "repo")
    scheduler = (repo / "wan_t2v_scheduler/config.pbtxt").read_text()
    assert "max_batch_size: 4\n" in scheduler and "max_queue_size: 3" in scheduler
    for step in ("preprocess", "text_encoder", "vae_decoder", "postprocess"):
        config = (repo / f"wan_t2v_{step}/config.pbtxt").read_text()
        assert "max_batch_size: 0\n" in config and "dynamic_batching" not in config
