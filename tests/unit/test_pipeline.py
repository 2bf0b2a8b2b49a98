"""The in-process pipeline (the stages the Triton models run) against diffusers' WanPipeline, on the torch engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from checks import assert_frames_close, reference_frames
from factories import load_deployment, validated_request
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.pipeline import LocalPipeline


@pytest.fixture(scope="module")
def pipeline(other_checkpoint):
    deployment = load_deployment("cpu_torch")
    ckpt = Checkpoint.open(other_checkpoint)
    return ckpt, deployment, LocalPipeline.load(ckpt, deployment, artifacts=Path("/nonexistent"))


def _request(ckpt, deployment, **values):
    return validated_request(
        deployment, spatial_multiple=ckpt.spatial_multiple, temporal_stride=ckpt.vae_scale_factor_temporal, **values
    )


@pytest.mark.parametrize(
    "call",
    [
        # Guidance on, with both experts used (the boundary falls inside 8 steps at flow shift 5).
        dict(
            prompt="a fox runs",
            negative_prompt="dark",
            height=32,
            width=64,
            num_frames=9,
            num_inference_steps=8,
            guidance_scale=5.0,
            guidance_scale_2=2.0,
            seed=3,
        ),
        # Guidance off: guidance_scale <= 1 means one branch and no negative prompt, as in the reference.
        dict(
            prompt="a fox runs",
            negative_prompt="",
            height=48,
            width=32,
            num_frames=5,
            num_inference_steps=4,
            guidance_scale=1.0,
            guidance_scale_2=1.0,
            seed=4,
        ),
    ],
    ids=["guidance", "no-guidance"],
)
def test_matches_wan_pipeline(pipeline, other_checkpoint, call):
    ckpt, deployment, pipe = pipeline
    frames = pipe.generate(_request(ckpt, deployment, **call))
    assert_frames_close(frames, reference_frames(other_checkpoint, **dict(call)))


def test_both_experts_run_and_switch_at_the_boundary(pipeline):
    ckpt, deployment, pipe = pipeline
    calls: list[str] = []
    for name, engine in pipe.denoiser.experts.items():
        original = engine.run

        def spy(inputs, _name=name, _run=original):
            calls.append(_name)
            return _run(inputs)

        engine.run = spy
    try:
        solver = ckpt.make_solver()
        solver.set_timesteps(8)
        boundary = ckpt.boundary_ratio * ckpt.num_train_timesteps
        expected = ["transformer" if t >= boundary else "transformer_2" for t in solver.timesteps]
        pipe.denoiser(
            _request(ckpt, deployment, prompt="x", num_inference_steps=8, num_frames=1, height=16, width=16, seed=0),
            pipe_embeds(pipe),
        )
    finally:
        for engine in pipe.denoiser.experts.values():
            del engine.run
    assert calls == expected and "transformer" in calls and "transformer_2" in calls


def pipe_embeds(pipe):
    from wan_triton.pipeline import encode_prompts

    return encode_prompts(pipe.tokenizer, pipe.text_encoder, ["x", ""])
