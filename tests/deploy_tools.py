"""The platform tier's (tests/platform) shipped files and tools: programs from Debian packages that `.ci/run`
installs (promtool and prometheus from `prometheus`). Outside CI a missing one skips its tests; with `CI` set it
fails them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

PLATFORM = Path(__file__).resolve().parents[1] / "model_repository" / "platform"


def tool(name: str) -> str:
    """The path of the program `name`, or a skip (a failure in CI, which installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path
