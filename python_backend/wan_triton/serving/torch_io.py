"""Triton tensors in and out of the steps that run a model, as torch tensors: GPU tensors pass through DLPack and
stay on their GPU, host tensors through numpy. (`triton` has the host-only glue.)"""

from __future__ import annotations

import torch
import torch.utils.dlpack

from wan_triton.serving.model_io import IO
from wan_triton.serving.triton import pb_utils


def read_torch(request, io: IO) -> torch.Tensor:
    """A required input as a torch tensor where Triton put it: GPU tensors arrive through DLPack without a copy
    (models on a GPU are rendered with FORCE_CPU_ONLY_INPUT_TENSORS=no), host tensors through numpy."""
    tensor = pb_utils().get_input_tensor_by_name(request, io.name)
    if tensor is None:
        raise ValueError(f"internal tensor {io.name!r} missing")
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy())
    return torch.from_dlpack(tensor.to_dlpack())


def output_torch(name: str, tensor: torch.Tensor):
    """An output from a torch tensor: a GPU tensor is handed over through DLPack and stays on its GPU, so the latents
    and the prompt embeddings never make a host round trip between GPU steps."""
    if tensor.is_cuda:
        return pb_utils().Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor.contiguous()))
    return pb_utils().Tensor(name, tensor.contiguous().numpy())
