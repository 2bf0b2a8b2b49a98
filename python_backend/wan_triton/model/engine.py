"""The engine interface: named torch tensors in, named torch tensors out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from wan_triton.config.deployment import EngineKind


class Engine(ABC):
    """Runs one graph. Returned tensors are owned by the caller (never internal buffers that a later call reuses)."""

    kind: EngineKind

    @abstractmethod
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once. `inputs` holds every input the component's spec names."""
