"""Request validation as pure logic (the server tests check the same rules through Triton)."""

from __future__ import annotations

import numpy as np
import pytest

from factories import load_deployment, validated_request
from wan_triton.config.deployment import Deployment
from wan_triton.config.request import InvalidRequestError, validate_request

DEPLOYMENT = load_deployment("cpu")


def validate(**inputs):
    return validated_request(DEPLOYMENT, **inputs)


def test_defaults_fill_every_optional_input():
    req = validate(prompt=b"a cat", seed=3)
    d = DEPLOYMENT.defaults
    assert (req.height, req.width, req.num_frames, req.num_inference_steps) == (
        d.height,
        d.width,
        d.num_frames,
        d.num_inference_steps,
    )
    assert (req.guidance_scale, req.guidance_scale_2, req.fps, req.negative_prompt) == (
        d.guidance_scale,
        d.guidance_scale_2,
        d.fps,
        d.negative_prompt,
    )
    assert req.seed == 3 and req.do_classifier_free_guidance


def test_guidance_at_or_below_one_turns_guidance_off():
    assert not validate(prompt=b"a cat", guidance_scale=1.0).do_classifier_free_guidance
    assert validate(prompt=b"a cat", guidance_scale=1.01).do_classifier_free_guidance


def test_limits_are_inclusive():
    lim = DEPLOYMENT.limits
    req = validate(
        prompt=b"x" * lim.max_prompt_chars,
        num_frames=lim.max_num_frames,
        num_inference_steps=lim.max_num_inference_steps,
        guidance_scale=50.0,
        guidance_scale_2=0.0,
    )
    assert req.num_frames == lim.max_num_frames


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({}, "prompt"),
        ({"prompt": b"a", "height": 17}, "height"),
        ({"prompt": b"a", "num_frames": 4}, "num_frames"),
        ({"prompt": b"a", "guidance_scale_2": float("-inf")}, "guidance_scale_2"),
        ({"prompt": b"\x80"}, "prompt"),
    ],
)
def test_errors_name_the_field(inputs, field):
    with pytest.raises(InvalidRequestError) as info:
        validate(**inputs)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_more_than_one_value_is_rejected():
    arrays = {"prompt": np.array([b"a"], dtype=object), "seed": np.array([1, 2])}
    with pytest.raises(InvalidRequestError, match="seed: must hold exactly one value"):
        validate_request(arrays, DEPLOYMENT, 16, 4)


def test_deployment_rejects_unknown_keys_and_defaults_above_limits():
    data = load_deployment("cpu")
    raw = data.model_dump()
    with pytest.raises(ValueError, match="extra"):
        Deployment.model_validate({**raw, "limitz": {}})
    raw["defaults"]["num_frames"] = 999
    with pytest.raises(ValueError, match="num_frames"):
        Deployment.model_validate(raw)
