"""GPU-only checks of the served denoiser configuration; skipped where no CUDA device is present (CPU CI).

The full-size measurements live in benchmarks/ (denoiser_step.py, gpu_numerics.py, gpu_e2e.sh); these keep the
GPU code paths under test on any GPU host: `python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import GPU_REQUEST as REQUEST

from wan_triton.checkpoint import Checkpoint
from wan_triton.components import build_denoiser
from wan_triton.deployment import ComponentConfig
from wan_triton.engines.base import EngineKind

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _latents(ckpt: Checkpoint, cfg: ComponentConfig, embeds: torch.Tensor) -> torch.Tensor:
    tf32 = cfg.precision != "float32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    return build_denoiser(ckpt, cfg, Path("/nonexistent"))(REQUEST, embeds).float().cpu()


@pytest.mark.parametrize("attention", ["cudnn", "auto"])
@pytest.mark.parametrize("compile_blocks", [False, True])
def test_bf16_gpu_denoiser_tracks_fp32_reference(other_checkpoint, attention, compile_blocks):
    ckpt = Checkpoint.open(other_checkpoint)
    embeds = torch.randn(2, 512, ckpt.text_dim, generator=torch.Generator().manual_seed(0))
    reference = _latents(ckpt, ComponentConfig(engine=EngineKind.TORCH, device="cuda", attention="reference"), embeds)
    served = _latents(
        ckpt,
        ComponentConfig(
            engine=EngineKind.TORCH,
            device="cuda",
            precision="bfloat16",
            attention=attention,
            compile_blocks=compile_blocks,
        ),
        embeds,
    )
    rel_l2 = float((served - reference).norm() / reference.norm())
    assert torch.isfinite(served).all() and rel_l2 <= 2e-2, rel_l2


def _served(ckpt: Checkpoint, **options) -> tuple[torch.Tensor, object]:
    cfg = ComponentConfig(engine=EngineKind.TORCH, device="cuda", precision="bfloat16", attention="cudnn", **options)
    embeds = torch.randn(2, 512, ckpt.text_dim, generator=torch.Generator().manual_seed(0))
    denoiser = build_denoiser(ckpt, cfg, Path("/nonexistent"))
    return denoiser(REQUEST, embeds).float().cpu(), denoiser


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_cuda_graph_replay_is_bit_identical_to_eager(other_checkpoint, compile_blocks):
    ckpt = Checkpoint.open(other_checkpoint)
    eager, _ = _served(ckpt, compile_blocks=compile_blocks, expert_residency="resident")
    graphed, denoiser = _served(ckpt, compile_blocks=compile_blocks, expert_residency="resident", cuda_graphs=True)
    engines = list(denoiser.experts.values())
    assert all(any(g is not None for g in e.graphs.values()) for e in engines), "no graph was captured"
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_swapped_experts_on_gpu_match_resident(other_checkpoint, cuda_graphs):
    ckpt = Checkpoint.open(other_checkpoint)
    resident, _ = _served(ckpt, expert_residency="resident", cuda_graphs=cuda_graphs)
    swapped, denoiser = _served(ckpt, expert_residency="swap", cuda_graphs=cuda_graphs)
    assert torch.equal(swapped, resident)
    assert denoiser.swapper.swaps_overlapped == 2 and denoiser.swapper.swaps_blocking == 0
