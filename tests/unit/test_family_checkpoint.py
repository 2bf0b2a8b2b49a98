"""The checkpoint kinds of the Wan2.2 family, read from the checkpoints themselves, and the chunked VAE encoder.

T2V-A14B, I2V-A14B and TI2V-5B differ only in their configs: `Checkpoint` reads what requests may carry
(`image_input`), the latent channels (the VAE's z_dim, not the transformer's input), the size multiple (VAE stride x
patch) and the experts present; a Wan2.1-style I2V checkpoint (CLIP image encoder) is refused. The encoder phases
(`vae_chunks.VaeEncoderPhase`, what the ONNX graphs are exported from) equal `vae.encode` for both VAEs.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from factories import OTHER_I2V, OTHER_TI2V
from wan_build.shapes_checkpoint import make_shapes_checkpoint
from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint
from wan_triton.model.checkpoint import Checkpoint, CheckpointError
from wan_triton.model.vae_chunks import build_encoder_phase_modules, encode_video, trace_encoder_layouts


@pytest.mark.parametrize(
    ("kind", "image_input", "latent_channels", "spatial_multiple", "experts", "params_b"),
    [
        ("t2v", "none", 16, 16, 2, 14.29),
        ("i2v", "required", 16, 16, 2, 14.29),
        ("ti2v", "optional", 48, 32, 1, 5.0),
    ],
)
def test_shapes_checkpoints_have_the_real_kinds(
    tmp_path, kind, image_input, latent_channels, spatial_multiple, experts, params_b
):
    ckpt = Checkpoint.open(make_shapes_checkpoint(tmp_path / kind, kind))
    assert ckpt.image_input == image_input
    assert ckpt.latent_channels == latent_channels
    assert ckpt.spatial_multiple == spatial_multiple
    assert sum(map(ckpt.has_expert, ("transformer", "transformer_2"))) == experts
    assert ckpt.expert_weight_bytes(torch.bfloat16) / 2e9 == pytest.approx(params_b, abs=0.1)
    assert ckpt.boundary_ratio == {"t2v": 0.875, "i2v": 0.9, "ti2v": None}[kind]


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("kinds") / "i2v", TinyConfig(**OTHER_I2V))


def test_wan21_style_image_encoder_is_refused(i2v_dir, tmp_path):
    other = shutil.copytree(i2v_dir, tmp_path / "wan21")
    index = json.loads((other / "model_index.json").read_text())
    index["image_encoder"] = ["transformers", "CLIPVisionModel"]
    (other / "model_index.json").write_text(json.dumps(index))
    (other / "image_encoder").mkdir()
    with pytest.raises(CheckpointError, match="CLIP `image_encoder`"):
        Checkpoint.open(other)


def test_input_channels_must_fit_the_kind(i2v_dir, tmp_path):
    other = shutil.copytree(i2v_dir, tmp_path / "t2v_named_i2v")
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "WanPipeline"  # an I2V transformer (28 input channels) in a text-to-video pipeline
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="takes 28 input channels.*needs 12"):
        Checkpoint.open(other)


def test_unknown_pipeline_is_refused(i2v_dir, tmp_path):
    other = shutil.copytree(i2v_dir, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "WanVACEPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'WanVACEPipeline' is not served"):
        Checkpoint.open(other)


@pytest.mark.parametrize("cfg", [OTHER_I2V, OTHER_TI2V], ids=["wan21-vae", "wan22-vae"])
@pytest.mark.parametrize("frames", [1, 9, 13])
def test_chunked_encode_equals_vae_encode(tmp_path, cfg, frames):
    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path / "ckpt", TinyConfig(**cfg)))
    vae = ckpt.load_vae()
    modules = build_encoder_phase_modules(vae)
    assert [m.layout.frames for m in modules] == [1, 4, 4]  # settles after three chunks, as the decoder does
    assert len(trace_encoder_layouts(vae)) == 3
    sp = ckpt.vae_scale_factor_spatial
    video = torch.rand(1, 3, frames, 2 * sp, 3 * sp, generator=torch.Generator().manual_seed(frames)) * 2 - 1

    def run(k, tensors):
        with torch.no_grad():
            return list(modules[k](*tensors))

    with torch.no_grad():
        expected = vae.encode(video).latent_dist.mode()
    got = encode_video(run, video, len(modules))
    assert got.shape == (1, ckpt.latent_channels, ckpt.num_latent_frames(frames), 2, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
