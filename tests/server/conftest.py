"""Fixtures of the server tier: the session's server itself is the `server` fixture of tests/conftest.py."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient


@pytest.fixture(scope="module")
def client(server):
    """A gRPC client of the session's server."""
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        yield c
