"""The postprocess step: the H.264 MP4 of the decoded frames (PyAV, on the host without torch), unless the
vae_decoder step encoded it while decoding (deployment `video.encode_while_decoding`). Then it hands that MP4 on
alone: the frames go from the vae_decoder step to the response (`model_io.ensemble_steps`)."""

from __future__ import annotations

import numpy as np

from wan_triton.config.request import GenerationRequest
from wan_triton.model.video import encode_mp4
from wan_triton.serving import model_io as io
from wan_triton.serving.models.base import StepModel, response
from wan_triton.serving.triton import output, read_inputs, read_request_json


class Postprocess(StepModel):
    """The H.264 MP4 of the decoded frames, and the frames themselves (where it encodes the MP4)."""

    role = "postprocess"

    def handle(self, request):
        inputs = read_inputs(request, [io.DECODED_FRAMES.name, io.DECODED_VIDEO.name])
        video = self.ctx.deployment.video
        if video.encode_while_decoding:
            mp4 = bytes(inputs[io.DECODED_VIDEO.name].reshape(-1)[0])
            if not mp4:
                raise RuntimeError("the vae_decoder step sent no MP4, though video.encode_while_decoding is on")
            return response(output(io.VIDEO.name, np.array([mp4], dtype=object)))
        frames = inputs[io.DECODED_FRAMES.name]
        if frames is None:
            raise RuntimeError("the vae_decoder step sent no frames to encode")
        req = GenerationRequest(**read_request_json(request, io.REQUEST_JSON))
        mp4 = encode_mp4(frames, req.fps, video.x264_preset, video.x264_crf, video.x264_tune)
        return response(output(io.VIDEO.name, np.array([mp4], dtype=object)), output(io.FRAMES.name, frames))
