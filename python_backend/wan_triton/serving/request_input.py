"""A request's inputs checked against the deployment and the checkpoint it serves, shared by preprocess and the
stream model (which checks first, so that bad input is answered INVALID_ARG rather than as a failed BLS call)."""

from __future__ import annotations

import numpy as np

from wan_triton.config.deployment import Deployment
from wan_triton.config.request import GenerationRequest, validate_request
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.image import condition_image


def validate_for(inputs: dict[str, np.ndarray | None], deployment: Deployment, ckpt: Checkpoint) -> GenerationRequest:
    """`validate_request` with the checkpoint's size multiples, image rule and expert count."""
    return validate_request(
        inputs,
        deployment,
        ckpt.spatial_multiple,
        ckpt.vae_scale_factor_temporal,
        image_input=ckpt.image_input,
        two_experts=ckpt.has_expert("transformer_2"),
    )


def request_image(request: GenerationRequest, deployment: Deployment) -> np.ndarray:
    """The request's image decoded and stretched to the video's size, uint8 [height, width, 3]; [0, 0, 3] without
    one. Refuses (InvalidRequestError naming `image`) what the deployment's image limits do not allow."""
    lim = deployment.limits
    return condition_image(request.image, request.width, request.height, lim.max_image_bytes, lim.max_image_pixels)
