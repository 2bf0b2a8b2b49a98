"""Fixtures of the unit tier."""

from __future__ import annotations

import pytest

from fakes import pb_utils


@pytest.fixture
def fake_pb(monkeypatch):
    """The fake `triton_python_backend_utils` (tests/fakes/pb_utils.py), installed for one test."""
    return pb_utils.install(monkeypatch)
