"""Make the repository's source directories importable in tests without installing them."""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent

# Inserted in reverse so python_backend ends up first on sys.path.
for _directory in ("client", "build", "python_backend"):
    _path = str(_REPO / _directory)
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# A tiny model whose config differs from the embedded default in every size the loader must read: layer count,
# widths, head count, vocabulary, text width and flow shift. Tests that serve it prove nothing is hard-coded.
OTHER_TINY = dict(
    num_layers=3,
    num_attention_heads=3,
    attention_head_dim=8,
    ffn_dim=40,
    text_dim=24,
    text_layers=3,
    text_heads=3,
    text_ff=48,
    vocab_pieces=300,
    vae_base_dim=6,
    flow_shift=5.0,
    seed=11,
)


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory) -> Path:
    from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_other", TinyConfig(**OTHER_TINY))


def reference_frames(checkpoint: Path, **call) -> np.ndarray:
    """diffusers' WanPipeline on the same weights, output_type="np", as uint8 frames [F, H, W, 3]."""
    from diffusers import WanPipeline

    seed = call.pop("seed")
    pipe = WanPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call).frames[0]
    return (out * 255).round().astype(np.uint8)


def assert_frames_close(ours: np.ndarray, ref: np.ndarray, max_levels: int = 2, mean_levels: float = 0.5) -> None:
    """The parity tolerance: at most `max_levels` uint8 levels apart anywhere, `mean_levels` on average."""
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= max_levels and diff.mean() <= mean_levels, (int(diff.max()), float(diff.mean()))
