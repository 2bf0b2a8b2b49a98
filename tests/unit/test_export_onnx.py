"""ONNX export of every component on a tiny checkpoint: symbolic dims where the specs say, and ONNX Runtime agrees
with PyTorch at shapes other than the export examples (which are batch 2, 3 latent frames, 4x6 latent pixels)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import onnx
import pytest
import torch

from factories import SHAPE_LIMITS as LIMITS
from wan_build.export_onnx import (
    CHECK_FILE,
    REL_L2_TOLERANCE,
    ExportError,
    check_graph_dims,
    export_all,
    source_hash,
)
from wan_build.tiny_model import TinyConfig, make_tiny_checkpoint
from wan_triton.model.checkpoint import EXPERTS, Checkpoint
from wan_triton.model.specs import ShapeLimits, denoiser_spec, text_encoder_spec, vae_decoder_phase_specs
from wan_triton.model.vae_chunks import onnx_vae_decode_fn
from wan_triton.runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from wan_triton.runtime.engines.tensorrt_engine import TensorRTEngine

# The dynamo exporter takes about a minute for the six graphs: not part of `make test-fast`.
pytestmark = pytest.mark.slow

# fp32 graphs: ONNX Runtime differs from PyTorch only by float reordering.
MAX_ABS = 1e-4


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((got - ref).double()) / torch.linalg.vector_norm(ref.double()))


def _assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < MAX_ABS
    assert _rel_l2(got, ref) < REL_L2_TOLERANCE


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Checkpoint:
    # One transformer/text layer keeps the exports fast; the architecture is otherwise the tiny default.
    cfg = TinyConfig(num_layers=1, text_layers=1)
    return Checkpoint.open(make_tiny_checkpoint(tmp_path_factory.mktemp("onnx_ckpt") / "tiny", cfg))


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    rows = export_all(ckpt, LIMITS, out)
    return out, rows


def _specs(ckpt):
    return [text_encoder_spec(ckpt), *(denoiser_spec(ckpt, LIMITS, e) for e in EXPERTS)] + vae_decoder_phase_specs(
        ckpt, LIMITS
    )


def test_every_graph_has_symbolic_dims_exactly_where_the_spec_says(ckpt, exported):
    out, _ = exported
    specs = _specs(ckpt)
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(f"{s.name}.onnx" for s in specs)
    for spec in specs:
        graph = onnx.load(str(out / f"{spec.name}.onnx"), load_external_data=False).graph
        assert [i.name for i in graph.input] == spec.input_names
        assert [o.name for o in graph.output] == spec.output_names
        for value, tensor in zip(graph.input, spec.inputs, strict=True):
            dims = value.type.tensor_type.shape.dim
            symbolic = [d.HasField("dim_param") for d in dims]
            assert symbolic == [isinstance(d, str) for d in tensor.shape], (spec.name, value.name, dims)
            fixed = [d.dim_value for d in dims if not d.HasField("dim_param")]
            assert fixed == [d for d in tensor.shape if isinstance(d, int)], (spec.name, value.name)
    # The denoiser keeps batch, frames, height and width dynamic; the text encoder batch.
    assert text_encoder_spec(ckpt).dynamic_axes()["input_ids"] == {0: "batch"}
    assert set(denoiser_spec(ckpt, LIMITS).dynamic_axes()["hidden_states"].values()) == {
        "batch",
        "latent_frames",
        "latent_height",
        "latent_width",
    }


def test_check_rows_within_tolerance_and_recorded(exported):
    out, rows = exported
    names = [r.component for r in rows]
    assert names == ["text_encoder", *EXPERTS, "vae_decoder_phase0", "vae_decoder_phase1", "vae_decoder_phase2"] + [
        "vae_decoder"
    ]
    for row in rows:
        assert row.ok, row
        assert row.max_abs < MAX_ABS, row
        assert not row.reused
    assert all(r.export_s and r.export_s > 0 for r in rows if r.component != "vae_decoder")
    assert [r["component"] for r in json.loads((out / CHECK_FILE).read_text())] == names


def test_text_encoder_matches_torch_at_batch_one(ckpt, exported):
    out, _ = exported
    tokens = ckpt.load_tokenizer()(
        ["a red robot dances in the rain"], padding="max_length", max_length=512, truncation=True, return_tensors="pt"
    )
    inputs = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
    got = OnnxRuntimeEngine(out / "text_encoder.onnx").run(inputs)["last_hidden_state"]
    with torch.no_grad():
        ref = ckpt.load_text_encoder().eval()(**inputs).last_hidden_state  # SDPA attention: the serving default
    _assert_close(got, ref)


@pytest.mark.parametrize("expert", EXPERTS)
@pytest.mark.parametrize("shape", [(1, 2, 6, 4), (2, 5, 8, 12)], ids=["b1f2_6x4", "b2f5_8x12"])
def test_expert_matches_torch_at_other_shapes(ckpt, exported, expert, shape):
    out, _ = exported
    batch, frames, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    inputs = {
        "hidden_states": torch.randn(batch, ckpt.latent_channels, frames, h, w, generator=g),
        "timestep": torch.tensor([937, 20][:batch]),
        "encoder_hidden_states": torch.randn(batch, 512, ckpt.text_dim, generator=g),
    }
    got = OnnxRuntimeEngine(out / f"{expert}.onnx").run(inputs)["noise_pred"]
    with torch.no_grad():
        ref = ckpt.load_transformer(expert)(**inputs, return_dict=False)[0]
    _assert_close(got, ref)


def test_chunked_vae_decode_through_onnxruntime_equals_vae_decode(ckpt, exported):
    out, _ = exported
    latents = torch.randn(1, 16, 3, 6, 4, generator=torch.Generator().manual_seed(4))
    got = onnx_vae_decode_fn(out, OnnxRuntimeEngine)(latents)
    with torch.no_grad():
        ref = ckpt.load_vae().decode(latents).sample
    assert got.shape == (1, 3, 9, 48, 32)
    _assert_close(got, ref)


def test_second_export_is_skipped(ckpt, exported):
    out, rows = exported
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")}
    t0 = time.perf_counter()
    again = export_all(ckpt, LIMITS, out)
    assert time.perf_counter() - t0 < 10
    assert all(r.reused for r in again)
    assert [(r.component, r.rel_l2) for r in again] == [(r.component, r.rel_l2) for r in rows]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")} == before


def test_source_hash_follows_config_and_limits(ckpt, tmp_path):
    specs = vae_decoder_phase_specs(ckpt, LIMITS)
    digest = source_hash(ckpt, "vae", specs)
    other_limits = ShapeLimits(64, 64, 17, 32, 32, 9)
    assert source_hash(ckpt, "vae", vae_decoder_phase_specs(ckpt, other_limits)) != digest
    copy = Checkpoint(shutil.copytree(ckpt.root, tmp_path / "copy"))
    assert source_hash(copy, "vae", specs) == digest  # content hashed, not paths or mtimes (small files)
    config = json.loads((copy.root / "vae" / "config.json").read_text())
    (copy.root / "vae" / "config.json").write_text(json.dumps({**config, "note": "changed"}))
    assert source_hash(copy, "vae", specs) != digest


def test_pinned_dim_is_reported(ckpt, exported, tmp_path):
    out, _ = exported
    model = onnx.load(str(out / "transformer.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # batch pinned, as a batch-2 example can do
    onnx.save(model, str(tmp_path / "pinned.onnx"))
    with pytest.raises(ExportError, match="hidden_states axis 0: pinned to 2"):
        check_graph_dims(tmp_path / "pinned.onnx", denoiser_spec(ckpt, LIMITS))


def test_onnxruntime_engine_reports_missing_inputs_and_returns_owned_tensors(exported):
    out, _ = exported
    engine = OnnxRuntimeEngine(out / "text_encoder.onnx")
    assert engine.input_names == ["input_ids", "attention_mask"]
    with pytest.raises(KeyError, match="missing inputs \\['attention_mask'\\]"):
        engine.run({"input_ids": torch.zeros(1, 512, dtype=torch.long)})
    # int32 ids are cast to the graph's int64.
    ids = torch.ones(1, 512, dtype=torch.int32)
    first = engine.run({"input_ids": ids, "attention_mask": ids})["last_hidden_state"]
    kept = first.clone()
    engine.run({"input_ids": ids * 2, "attention_mask": ids})
    assert torch.equal(first, kept) and isinstance(first, torch.Tensor)
    assert np.isfinite(first.numpy()).all()


def test_tensorrt_engine_is_a_clear_reserved_slot(ckpt):
    spec = text_encoder_spec(ckpt)
    with pytest.raises((RuntimeError, NotImplementedError), match="profile shapes"):
        TensorRTEngine("text_encoder", spec)
