"""Random-weight modules built from a checkpoint's configs, for benchmarking the real shapes.

Full-size weights cannot always be fetched (and speed does not depend on weight values), so a checkpoint folder
may hold configs only, marked by a `RANDOM_WEIGHTS` file (`python -m wan_build.shapes_checkpoint` writes one).
Its modules are then made directly on the target device in the target dtype, with the dtypes `from_pretrained`
would leave (diffusers keeps some Wan modules in fp32). Every load logs a warning: such a model makes noise.

A module made for host memory on a machine with a GPU (the swapped expert) draws its random values on the GPU, one
tensor at a time: the CPU's initialisation of a 14B expert in bf16 takes minutes of a benchmark's GPU time, the
GPU's seconds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MARKER = "RANDOM_WEIGHTS"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# The in-place initialisers of torch.nn.init that modules' constructors call (each fills its first argument).
_INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


@contextlib.contextmanager
def _initialisation_on(init_device: str) -> Iterator[None]:
    """Within: torch.nn.init's initialisers only record their calls; on leaving, each recorded call runs in order on a
    copy of its tensor on `init_device`, copied back into the tensor. (Values differ from an in-place build of the
    same seed: the random draws constructors make themselves, torch.randn, no longer fall between the initialisers.)"""
    import torch

    calls: list[tuple[Callable[..., Any], torch.Tensor, tuple, dict]] = []
    originals = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}

    def deferred(initialiser: Callable[..., Any]) -> Callable[..., Any]:
        def record(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append((initialiser, tensor, args, kwargs))
            return tensor

        return record

    for name, initialiser in originals.items():
        setattr(torch.nn.init, name, deferred(initialiser))
    try:
        yield
    finally:
        for name, initialiser in originals.items():
            setattr(torch.nn.init, name, initialiser)
    with torch.no_grad():
        for initialiser, tensor, args, kwargs in calls:
            work = torch.empty_like(tensor, device=init_device)
            initialiser(work, *args, **kwargs)
            tensor.copy_(work)


def build(factory, dtype: torch.dtype, device: str, keep_in_fp32: list[str] | None = None) -> torch.nn.Module:
    """`factory()` under `device` and `dtype` defaults, then the `keep_in_fp32` submodules cast back to fp32. A module
    made in host memory where there is a GPU takes its random values from the GPU."""
    # Imported here: `Checkpoint` reads MARKER in processes that never build a module (preprocess), without torch.
    import torch

    draw_on = "cuda" if device == "cpu" and torch.cuda.is_available() else device
    logger.warning(
        "building %s with RANDOM weights (benchmark checkpoint) on %s (drawn on %s)",
        getattr(factory, "__name__", "?"),
        device,
        draw_on,
    )
    initialisation = _initialisation_on(draw_on) if draw_on != device else contextlib.nullcontext()
    with torch.device(device), _default_dtype(dtype if dtype.is_floating_point else torch.float32), initialisation:
        module = factory()
    for name, sub in module.named_modules():
        if keep_in_fp32 and any(part in keep_in_fp32 for part in name.split(".")):
            sub.float()
    if keep_in_fp32:
        for name, param in module.named_parameters():
            if any(part in keep_in_fp32 for part in name.split(".")):
                param.data = param.data.float()
    return module.eval().requires_grad_(False)
