"""The chunked VAE decode (explicit cache tensors, one phase graph per cache structure) equals `vae.decode`."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from factories import SHAPE_LIMITS as LIMITS
from wan_build.tiny_model import make_tiny_checkpoint
from wan_triton.config.deployment import ComponentConfig, Components, EngineKind
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.engine import Engine
from wan_triton.model.specs import vae_decoder_phase_specs
from wan_triton.model.vae_chunks import (
    REP,
    CacheSlot,
    EngineVaeDecoder,
    TorchVaeDecoder,
    layouts_from_config,
    trace_layouts,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Checkpoint:
    return Checkpoint.open(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_vae_ckpt")))


@pytest.fixture(scope="module")
def vae(ckpt):
    return ckpt.load_vae()


@pytest.fixture(scope="module")
def decoder(vae) -> TorchVaeDecoder:
    return TorchVaeDecoder(vae)


def _latents(frames: int, h: int = 4, w: int = 6, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 16, frames, h, w, generator=torch.Generator().manual_seed(seed))


def test_layouts_settle_after_three_phases(vae, ckpt):
    layouts = trace_layouts(vae)
    assert [layout.index for layout in layouts] == [0, 1, 2]
    first, second, steady = layouts
    assert first.first_chunk and not second.first_chunk
    assert first.input_slots == []  # nothing cached before the first chunk
    assert REP in first.outputs and REP in second.inputs  # temporal upsamplers replicate on chunk 1
    assert steady.inputs == steady.outputs == second.outputs
    assert all(isinstance(s, CacheSlot) and s.frames in (1, 2) for s in second.inputs if s not in (None, REP))
    assert all(s.frames == 2 for s in steady.inputs if isinstance(s, CacheSlot))
    assert (first.video_frames, steady.video_frames) == (1, ckpt.vae_scale_factor_temporal)
    # The config-only (meta device) trace agrees with the one on the loaded VAE.
    assert layouts_from_config(ckpt.config("vae")) == layouts


@pytest.mark.parametrize("frames", [1, 2, 3, 5])
def test_chunked_decode_equals_vae_decode(vae, decoder, frames):
    latents = _latents(frames)
    with torch.no_grad():
        expected = vae.decode(latents).sample
    got = decoder.decode(latents)
    assert got.shape == expected.shape == (1, 3, 1 + 4 * (frames - 1), 32, 48)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert got.abs().max() <= 1.0


def test_phases_compile_whole_and_decode_the_same(vae):
    # fullgraph: a graph break would fail here. The eager backend keeps this to dynamo's tracing; inductor's kernels
    # are compared with the eager decode on the GPU (tests/gpu/test_gpu_vae_half.py).
    compiled = TorchVaeDecoder(vae, whole_post_quant_conv=True)
    compiled.compile(backend="eager")
    latents = _latents(4, seed=5)
    with torch.no_grad():
        expected = vae.decode(latents).sample
    torch.testing.assert_close(compiled.decode(latents), expected, atol=0, rtol=0)
    chunks = list(compiled.decode_chunks(latents))
    torch.testing.assert_close(torch.cat(chunks, dim=2), expected, atol=0, rtol=0)


def test_phases_refuse_to_compile_on_a_torch_whose_dynamo_cannot_trace_them(vae, monkeypatch):
    # torch 2.11 fails only when the first decode compiles (at the server's warm-up, or a request without one): the
    # refusal comes at load instead, naming the setting.
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.11.0+cu130"))
    with pytest.raises(RuntimeError, match="compile_phases needs torch 2.13 or later: torch 2.11.0"):
        TorchVaeDecoder(vae, whole_post_quant_conv=True).compile(backend="eager")


def test_compile_phases_is_a_torch_vae_decoder_setting():
    torch_cpu = ComponentConfig(engine="torch")
    compiled = ComponentConfig(engine="torch", compile_phases=True)
    assert Components(text_encoder=torch_cpu, denoiser=torch_cpu, vae_decoder=compiled).vae_decoder.compile_phases
    with pytest.raises(ValidationError, match="denoiser: compile_phases is a vae_decoder setting"):
        Components(
            text_encoder=torch_cpu, denoiser=ComponentConfig(engine="torch", compile_phases=True), vae_decoder=torch_cpu
        )
    with pytest.raises(ValidationError, match="compile_phases needs engine: torch and split_width 1"):
        ComponentConfig(engine="onnxruntime", compile_phases=True)
    with pytest.raises(ValidationError, match="compile_phases needs engine: torch and split_width 1"):
        ComponentConfig(engine="torch", compile_phases=True, split_width=2)


def test_batch_decodes_item_by_item(decoder):
    latents = _latents(2, batch=2, seed=3)
    got = decoder.decode(latents)
    for i in range(2):
        torch.testing.assert_close(got[i : i + 1], decoder.decode(latents[i : i + 1]), atol=0, rtol=0)


def test_phase_specs_describe_the_modules(ckpt, decoder):
    """Every tensor a phase module takes and returns has the shape its spec gives at that latent size."""
    specs = vae_decoder_phase_specs(ckpt, LIMITS)
    assert len(specs) == len(decoder.phases)
    latent_hw = {"latent_height": 3, "latent_width": 5}
    cache: list[torch.Tensor] = []
    for spec, phase in zip(specs, decoder.phases, strict=True):
        dims = {name: latent_hw[name.partition("_x")[0]] * int(name.partition("_x")[2] or 1) for name in spec.dims}

        def shape(t, dims=dims):
            return tuple(d if isinstance(d, int) else dims[d] for d in t.shape)

        inputs = [torch.randn(shape(spec.inputs[0])), *cache]
        assert [tuple(t.shape) for t in inputs] == [shape(t) for t in spec.inputs]
        with torch.no_grad():
            outputs = phase(*inputs)
        assert [tuple(t.shape) for t in outputs] == [shape(t) for t in spec.outputs]
        cache = list(outputs[1:])
    # The steady phase's cache out feeds its own cache in.
    assert [t.shape for t in specs[-1].inputs[1:]] == [t.shape for t in specs[-1].outputs[1:]]


class _PhaseEngine(Engine):
    """A phase module behind the Engine interface, bound by the spec's names like an exported graph."""

    kind = EngineKind.TORCH

    def __init__(self, phase, spec):
        self.phase, self.spec = phase, spec

    def run(self, inputs):
        with torch.no_grad():
            outputs = self.phase(*(inputs[name] for name in self.spec.input_names))
        return dict(zip(self.spec.output_names, outputs, strict=True))


def test_engine_decoder_binds_by_spec_names(ckpt, vae, decoder):
    specs = vae_decoder_phase_specs(ckpt, LIMITS)
    engines = [_PhaseEngine(p, s) for p, s in zip(decoder.phases, specs, strict=True)]
    engine_decoder = EngineVaeDecoder(engines, [(s.input_names, s.output_names) for s in specs])
    latents = _latents(4, seed=5)
    with torch.no_grad():
        expected = vae.decode(latents).sample
    torch.testing.assert_close(engine_decoder.decode(latents), expected, atol=ATOL, rtol=0)
    # Chunk by chunk as each latent frame decodes (what encoding while decoding consumes): 1 frame, then 4 each.
    chunks = list(engine_decoder.decode_chunks(latents))
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    torch.testing.assert_close(torch.cat(chunks, dim=2), expected, atol=ATOL, rtol=0)


def test_residual_patchified_vae():
    """The Wan2.2 TI2V-style decoder (residual up blocks using `first_chunk`, patch_size 2) chunks the same way."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
    ).eval()
    latents = _latents(3, h=3, w=2, seed=7)
    with torch.no_grad():
        expected = vae.decode(latents).sample
    torch.testing.assert_close(TorchVaeDecoder(vae).decode(latents), expected, atol=ATOL, rtol=0)
    # post_quant_conv over the whole latents, as vae.decode runs it: the decoder sees the same tensors, bit for bit.
    assert torch.equal(TorchVaeDecoder(vae, whole_post_quant_conv=True).decode(latents), expected)
