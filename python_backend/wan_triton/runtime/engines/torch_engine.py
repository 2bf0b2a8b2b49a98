"""Engines that run the library modules (diffusers / transformers) directly in PyTorch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from wan_triton.config.deployment import EngineKind
from wan_triton.model.engine import Engine


class TorchEngine(Engine):
    """Calls `fn(**inputs)` under inference mode. Float inputs are cast to the engine's precision."""

    kind = EngineKind.TORCH

    def __init__(self, fn: Callable[..., torch.Tensor], output_name: str, device: torch.device, dtype: torch.dtype):
        self.fn = fn
        self.output_name = output_name
        self.device = device
        self.dtype = dtype

    def prepare(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor on the engine's device; floating point in the engine's precision."""
        tensor = tensor.to(self.device)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self.fn(**{name: self.prepare(t) for name, t in inputs.items()})
        return {self.output_name: out}


def text_encoder_engine(module, device: torch.device, dtype: torch.dtype) -> TorchEngine:
    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return module(input_ids, attention_mask).last_hidden_state

    return TorchEngine(forward, "last_hidden_state", device, dtype)


def denoiser_engine(module, device: torch.device, dtype: torch.dtype) -> TorchEngine:
    def forward(hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return module(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            return_dict=False,
        )[0]

    return TorchEngine(forward, "noise_pred", device, dtype)
