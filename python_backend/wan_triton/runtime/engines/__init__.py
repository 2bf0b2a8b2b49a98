"""Engines run one component's graph. The implementation is chosen per component in the deployment config."""

from wan_triton.config.deployment import EngineKind
from wan_triton.model.engine import Engine

__all__ = ["Engine", "EngineKind"]
