"""The stream model `<model_name>_stream`: it calls the other steps through BLS and runs no model itself, so it
imports no torch (see `serving.stream`)."""

from __future__ import annotations

from wan_triton.serving.models.base import StepModel
from wan_triton.serving.stream import StreamRunner


class Stream(StepModel):
    """The streaming endpoint `<model_name>_stream` (decoupled): see `stream.StreamRunner`."""

    role = "stream"

    def load(self) -> None:
        self.runner = StreamRunner(self.ctx.deployment, self.ctx.checkpoint, self.metrics, self.ctx.name)

    def execute(self, requests):
        for request in requests:
            self.runner.submit(request)
        return None  # decoupled: every request is answered from its own thread

    def finalize(self) -> None:
        self.runner.close()
        super().finalize()
