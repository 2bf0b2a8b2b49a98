"""Triton Python-backend entry point of the ${role} model; the logic lives in `wan_triton.serving.models`."""

from wan_triton.serving.models import ${class_name} as TritonPythonModel  # noqa: F401
