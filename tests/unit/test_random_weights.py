"""Configs-only benchmark checkpoints: modules are built with random weights, with from_pretrained's dtypes."""

from __future__ import annotations

import shutil

import pytest
import torch

from wan_build.shapes_checkpoint import A14B_TRANSFORMER, make_shapes_checkpoint
from wan_triton.model.checkpoint import Checkpoint, CheckpointError
from wan_triton.model.random_init import MARKER


@pytest.fixture()
def configs_only(other_checkpoint, tmp_path):
    root = tmp_path / "configs_only"
    shutil.copytree(other_checkpoint, root)
    for weights in root.rglob("*.safetensors"):
        weights.unlink()
    return root


def test_weights_are_required_without_the_marker(configs_only):
    with pytest.raises(CheckpointError, match="no .safetensors"):
        Checkpoint.open(configs_only)


def test_marker_builds_random_modules_in_the_pretrained_dtypes(configs_only):
    (configs_only / MARKER).write_text("benchmark\n")
    ckpt = Checkpoint.open(configs_only)
    expert = ckpt.load_transformer("transformer", torch.bfloat16)
    assert expert.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert expert.scale_shift_table.dtype == torch.float32  # kept in fp32, as from_pretrained does
    assert expert.blocks[0].attn1.to_q.weight.float().std() > 0
    out = expert(
        torch.randn(1, 16, 1, 4, 4, dtype=torch.bfloat16),
        torch.tensor([500]),
        torch.randn(1, 512, ckpt.text_dim, dtype=torch.bfloat16),
        return_dict=False,
    )[0]
    assert out.shape == (1, 16, 1, 4, 4) and torch.isfinite(out).all()
    encoder = ckpt.load_text_encoder(torch.bfloat16)
    assert encoder.shared.weight.dtype == torch.bfloat16
    assert ckpt.load_vae().decoder.conv_in.weight.dtype == torch.float32


def test_a14b_shapes_checkpoint_has_the_real_configs(tmp_path):
    ckpt = Checkpoint.open(make_shapes_checkpoint(tmp_path / "a14b"))
    assert ckpt.random_weights and ckpt.boundary_ratio == 0.875
    cfg = ckpt.config("transformer")
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["ffn_dim"]) == (
        A14B_TRANSFORMER["num_layers"],
        A14B_TRANSFORMER["num_attention_heads"],
        A14B_TRANSFORMER["ffn_dim"],
    )
    assert ckpt.text_dim == 4096 and ckpt.config("scheduler")["flow_shift"] == 12.0
