"""Triton Python-backend entry point of the ${role} model; the logic lives in `wan_triton.serving.models.${role}`."""

from wan_triton.serving.models.${role} import ${class_name} as TritonPythonModel  # noqa: F401
