"""TensorRT engine: a reserved slot. Plans would be built from the same specs' min/opt/max profiles."""

from __future__ import annotations

import torch

from wan_triton.config.deployment import EngineKind
from wan_triton.model.engine import Engine
from wan_triton.model.specs import ComponentSpec


class TensorRTEngine(Engine):
    """Refuses construction: TensorRT is not part of this environment and no plan builder exists yet."""

    kind = EngineKind.TENSORRT

    def __init__(self, component: str, spec: ComponentSpec | None = None) -> None:
        profile = spec.profile() if spec is not None else f"see wan_triton.model.specs for {component!r}"
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                f"{component}: TensorRT is not installed in this environment; the specs carry the profile shapes: "
                f"{profile}"
            ) from exc
        raise NotImplementedError(
            f"{component}: the TensorRT engine is reserved but not implemented; build plans from the ONNX graphs "
            f"with these profile shapes (min, opt, max): {profile}"
        )

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover - unreachable
        raise NotImplementedError
