"""Request validation as pure logic (the server tests check the same rules through Triton)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from factories import load_deployment, validated_request
from wan_triton.config.deployment import Deployment
from wan_triton.config.request import GenerationRequest, InvalidRequestError, request_json, validate_request

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


PNG = (
    b"\x89PNG\r\n\x1a\n..."  # validation checks presence only; the content is decoded later (tests/unit/test_image.py)
)


def _refusal(**inputs) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        validate(**inputs)
    return info.value


def test_text_to_video_refuses_an_image():
    error = _refusal(prompt=b"a", image=PNG)
    assert error.field == "image" and "takes no image" in str(error)


def test_image_to_video_requires_an_image():
    error = _refusal(prompt=b"a", image_input="required")
    assert error.field == "image" and "is required" in str(error) and "PNG, JPEG or WebP" in str(error)
    req = validate(prompt=b"a", image=PNG, image_input="required")
    assert req.image == PNG and req.has_image


def test_optional_image_may_be_left_out():
    req = validate(prompt=b"a", image_input="optional")
    assert req.image is None and not req.has_image
    assert validate(prompt=b"a", image=PNG, image_input="optional").has_image


def test_image_must_be_bytes():
    arrays = {"prompt": np.array([b"a"], dtype=object), "image": np.array([3], dtype=np.int64)}
    with pytest.raises(InvalidRequestError, match="image: must be a BYTES tensor"):
        validate_request(arrays, DEPLOYMENT, 16, 4, image_input="optional")


def test_request_json_carries_no_image_bytes():
    req = validate(prompt=b"a", image=PNG, image_input="required")
    data = json.loads(request_json(req))
    assert data["image"] is None and data["has_image"] is True
    assert GenerationRequest(**data) == dataclasses.replace(req, image=None)


def test_guidance_scale_2_refused_by_a_single_expert_model():
    error = _refusal(prompt=b"a", guidance_scale_2=3.0, two_experts=False)
    assert error.field == "guidance_scale_2" and "one expert" in str(error)
    assert validate(prompt=b"a", two_experts=False).guidance_scale == DEPLOYMENT.defaults.guidance_scale


@pytest.mark.parametrize("field", ["height", "width"])
def test_size_not_a_multiple_is_refused_never_rounded(field):
    error = _refusal(prompt=b"a", spatial_multiple=32, **{field: 48})
    assert error.field == field and "multiple of 32" in str(error) and "got 48" in str(error)
    assert getattr(validate(prompt=b"a", spatial_multiple=32, **{field: 64}), field) == 64


def test_image_limits_have_defaults_and_are_strict():
    lim = DEPLOYMENT.limits
    assert (lim.max_image_bytes, lim.max_image_pixels) == (20 << 20, 4096 * 4096)
    raw = load_deployment("cpu").model_dump()
    raw["limits"]["max_image_bytes"] = 0
    with pytest.raises(ValueError, match="max_image_bytes"):
        Deployment.model_validate(raw)
