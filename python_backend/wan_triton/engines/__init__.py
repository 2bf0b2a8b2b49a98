"""Engines run one component's graph. The implementation is chosen per component in the deployment config."""

from .base import Engine, EngineKind

__all__ = ["Engine", "EngineKind"]
