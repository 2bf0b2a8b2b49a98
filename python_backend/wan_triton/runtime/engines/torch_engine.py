"""Engines that run the library modules (diffusers / transformers) directly in PyTorch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from wan_triton.config.deployment import EngineKind
from wan_triton.model.denoise import call_transformer
from wan_triton.model.engine import Engine


class TorchEngine(Engine):
    """Calls `fn(**inputs)` under inference mode. Float inputs are cast to the engine's precision, except those in
    `KEEP_DTYPE`."""

    kind = EngineKind.TORCH
    # Per-frame timesteps (float32) stay float32, as the reference passes them: bfloat16 cannot hold 999.
    KEEP_DTYPE = frozenset({"timestep"})

    def __init__(self, fn: Callable[..., torch.Tensor], output_name: str, device: torch.device, dtype: torch.dtype):
        self.fn = fn
        self.output_name = output_name
        self.device = device
        self.dtype = dtype

    def prepare(self, tensor: torch.Tensor, name: str = "") -> torch.Tensor:
        """The input `name` on the engine's device; floating point in the engine's precision (not `KEEP_DTYPE`)."""
        tensor = tensor.to(self.device)
        return tensor.to(self.dtype) if tensor.is_floating_point() and name not in self.KEEP_DTYPE else tensor

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self.fn(**{name: self.prepare(t, name) for name, t in inputs.items()})
        return {self.output_name: out}


def text_encoder_engine(module, device: torch.device, dtype: torch.dtype) -> TorchEngine:
    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return module(input_ids, attention_mask).last_hidden_state

    return TorchEngine(forward, "last_hidden_state", device, dtype)


def denoiser_engine(module, device: torch.device, dtype: torch.dtype) -> TorchEngine:
    def forward(hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return call_transformer(module, hidden_states, timestep, encoder_hidden_states)

    return TorchEngine(forward, "noise_pred", device, dtype)
