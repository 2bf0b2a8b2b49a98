"""The postprocess step: the H.264 MP4 of the decoded frames (PyAV, on the host without torch)."""

from __future__ import annotations

import numpy as np

from wan_triton.config.request import GenerationRequest
from wan_triton.model.video import encode_mp4
from wan_triton.serving import model_io as io
from wan_triton.serving.models.base import StepModel, response
from wan_triton.serving.triton import output, read_inputs, read_request_json


class Postprocess(StepModel):
    """The H.264 MP4 of the decoded frames, and the frames themselves."""

    role = "postprocess"

    def handle(self, request):
        req = GenerationRequest(**read_request_json(request, io.REQUEST_JSON))
        frames = read_inputs(request, [io.DECODED_FRAMES.name])[io.DECODED_FRAMES.name]
        video = self.ctx.deployment.video
        mp4 = encode_mp4(frames, req.fps, video.x264_preset, video.x264_crf)
        return response(output(io.VIDEO.name, np.array([mp4], dtype=object)), output(io.FRAMES.name, frames))
