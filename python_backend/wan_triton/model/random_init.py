"""Random-weight modules built from a checkpoint's configs, for benchmarking the real shapes.

Full-size weights cannot always be fetched (and speed does not depend on weight values), so a checkpoint folder
may hold configs only, marked by a `RANDOM_WEIGHTS` file (`python -m wan_build.shapes_checkpoint` writes one).
Its modules are then made directly on the target device in the target dtype, with the dtypes `from_pretrained`
would leave (diffusers keeps some Wan modules in fp32). Every load logs a warning: such a model makes noise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

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


def build(factory, dtype: torch.dtype, device: str, keep_in_fp32: list[str] | None = None) -> torch.nn.Module:
    """`factory()` under `device` and `dtype` defaults, then the `keep_in_fp32` submodules cast back to fp32."""
    # Imported here: `Checkpoint` reads MARKER in processes that never build a module (preprocess), without torch.
    import torch

    logger.warning(
        "building %s with RANDOM weights (benchmark checkpoint) on %s", getattr(factory, "__name__", "?"), device
    )
    with torch.device(device), _default_dtype(dtype if dtype.is_floating_point else torch.float32):
        module = factory()
    for name, sub in module.named_modules():
        if keep_in_fp32 and any(part in keep_in_fp32 for part in name.split(".")):
            sub.float()
    if keep_in_fp32:
        for name, param in module.named_parameters():
            if any(part in keep_in_fp32 for part in name.split(".")):
                param.data = param.data.float()
    return module.eval().requires_grad_(False)
