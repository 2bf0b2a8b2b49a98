"""Triton's perf_analyzer as the tritonclient wheel installs it, and the shared libraries it needs.

perf_analyzer 2.51 ships inside the tritonclient 2.51.0 wheel (installed by `make setup`). It needs two shared
libraries that the wheel does not carry: `libb64.so.0d` (apt `libb64-0d`, which `.ci/run` installs) and
`libcudart.so.12` (PyPI `nvidia-cuda-runtime-cu12`, in the dev extras), whose folder `environment()` puts on
LD_LIBRARY_PATH.
"""

from __future__ import annotations

import base64
import ctypes
import importlib.metadata
import importlib.util
import os
import struct
from pathlib import Path

LIBB64 = "libb64.so.0d"
LIBCUDART = "libcudart.so.12"


class PerfAnalyzerError(RuntimeError):
    pass


def perf_analyzer_binary() -> Path:
    """The perf_analyzer executable the tritonclient wheel installed (its data scripts, e.g. `.venv/bin`)."""
    try:
        files = importlib.metadata.files("tritonclient") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise PerfAnalyzerError("tritonclient is not installed; run `make setup`") from error
    for file in files:
        if file.name == "perf_analyzer":
            path = Path(file.locate()).resolve()
            if path.is_file():
                return path
    raise PerfAnalyzerError("the tritonclient wheel installed no perf_analyzer binary")


def cuda_runtime_libdir() -> Path | None:
    """The folder holding libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel, or None when not installed."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        return None
    libdir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return libdir if (libdir / LIBCUDART).is_file() else None


def environment() -> dict[str, str]:
    """This process's environment with the CUDA runtime's folder first on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    libdir = cuda_runtime_libdir()
    if libdir is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libdir), env.get("LD_LIBRARY_PATH")) if p)
    return env


def missing_libraries() -> list[str]:
    """Shared libraries perf_analyzer needs that cannot be loaded here, with where each comes from."""
    missing = []
    try:
        ctypes.CDLL(LIBB64)
    except OSError:
        missing.append(f"{LIBB64} (apt-get install libb64-0d)")
    if cuda_runtime_libdir() is None:
        missing.append(f"{LIBCUDART} (pip install nvidia-cuda-runtime-cu12, in the dev extras)")
    return missing


def bytes_input(data: bytes) -> dict[str, str]:
    """One BYTES element of shape [1] in perf_analyzer's input-data JSON: `{"b64": ...}` holds the tensor's raw
    buffer, which for BYTES is each element's 4-byte little-endian length and then its bytes (Triton's
    serialization), so that a binary file (an image) goes as it is."""
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")}


def with_image(input_data: dict, image: bytes) -> dict:
    """perf_analyzer input data (`{"data": [request, ...]}`) with every request sending `image`."""
    return {**input_data, "data": [{**entry, "image": bytes_input(image)} for entry in input_data["data"]]}
