"""Triton Python-backend entry point of the ${role} model; the logic lives in `wan_triton.serving.models.${role}`."""

import logging
import os

# Triton's Python backend takes a stub for dead when the stub's health thread has not run for a second, and the
# load or request under way then fails (docs/triton-2.51-notes.md). Linux keeps a nice value per thread: from here
# on, this thread (the stub's main one) and every thread it starts (torch's, ONNX Runtime's) yield the CPU to that
# health thread, which the stub started before it imported this file.
os.nice(${nice})  # the deployment's serving.model_thread_nice

from wan_triton.serving.models.${role} import ${class_name}  # noqa: E402
from wan_triton.serving.stub_exit import end_stub_process  # noqa: E402


class TritonPythonModel(${class_name}):
    def finalize(self) -> None:
        # The stub's own teardown after finalize can hang for good, and the server waits on it
        # (wan_triton.serving.stub_exit): this process ends here, whether finalize succeeded or not.
        try:
            super().finalize()
        except Exception:
            logging.getLogger("wan_triton.serving").exception("finalize of the ${role} model failed")
        end_stub_process("${role}")
