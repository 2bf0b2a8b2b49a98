"""Configs-only benchmark checkpoints: modules are built with random weights, with from_pretrained's dtypes."""

from __future__ import annotations

import shutil

import pytest
import torch

from wan_build.shapes_checkpoint import A14B_TRANSFORMER, make_shapes_checkpoint
from wan_triton.model import random_init
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


def _factories(root):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = WanTransformer3DModel.load_config(root / "transformer")
    text_encoder = UMT5Config.from_pretrained(root / "text_encoder")
    vae = AutoencoderKLWan.load_config(root / "vae")
    return {
        "transformer": lambda: WanTransformer3DModel.from_config(transformer),
        "text_encoder": lambda: UMT5EncoderModel(text_encoder),
        "vae": lambda: AutoencoderKLWan.from_config(vae),
    }


class _NanEmpty(torch.overrides.TorchFunctionMode):
    """torch.empty filled with NaN, so that a tensor no initialiser reached shows."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.empty and out.is_floating_point():
            out.fill_(float("nan"))
        return out


@pytest.mark.parametrize("part", ["transformer", "text_encoder", "vae"])
def test_initialisation_drawn_after_construction_reaches_every_tensor(other_checkpoint, part):
    """The swapped expert's values are drawn on the GPU after the module is made in host memory: the deferred
    initialisers must reach every tensor the constructor initialises (one left out keeps torch.empty's contents),
    constants as they are, random ones random. (The values differ from an in-place draw of the same seed: randn calls
    in the constructors come between the initialisers there.)"""
    factory = _factories(other_checkpoint)[part]
    direct = factory().state_dict()
    with _NanEmpty(), random_init._initialisation_on("cpu"):
        deferred = factory().state_dict()
    assert torch.nn.init.kaiming_uniform_.__name__ == "kaiming_uniform_"  # the initialisers are restored
    assert direct.keys() == deferred.keys()
    for name, value in deferred.items():
        assert value.dtype == direct[name].dtype and value.shape == direct[name].shape, name
        if not value.is_floating_point():
            continue
        assert torch.isfinite(value).all(), f"{name} was not initialised"
        constant = direct[name].numel() > 1 and bool((direct[name] == direct[name].flatten()[0]).all())
        if constant:
            assert torch.equal(value, direct[name]), name
        elif direct[name].numel() > 1:
            assert value.std() > 0, name
