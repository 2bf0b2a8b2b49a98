"""LoRA adapters fused at build time and the solver override, against diffusers' WanPipeline with the same LoRAs
loaded its own way (`load_lora_weights` + `set_adapters`) and the same solver swap: the frames of the built
repository's deployment, run in-process (LocalPipeline) on the torch engine, within the parity tolerance; every
LoRA case also differs visibly from the frames without it, so parity cannot hold vacuously. The LoRAs are fused
before the engine sees the weights: the ONNX Runtime engine's parity, with every format, is shown through the real
server (tests/server/test_lora_server.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from checks import assert_frames_close
from factories import DEPLOYMENTS_DIR, validated_request
from lora_files import lightx2v_lora, peft_lora, reference_frames, wan_lora
from wan_build.__main__ import main as build_main
from wan_triton.config.deployment import DEPLOYMENT_FILE, Deployment
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.pipeline import LocalPipeline

# Guidance on, both experts used (the boundary falls inside 8 steps at the checkpoint's flow shift 5).
CALL = dict(
    prompt="a fox runs",
    negative_prompt="dark",
    height=32,
    width=48,
    num_frames=5,
    num_inference_steps=8,
    guidance_scale=5.0,
    guidance_scale_2=2.0,
    seed=3,
)
# The fast mode's settings: Euler at shift 5, 4 steps, no guidance on either expert.
DISTILL_CALL = {**CALL, "num_inference_steps": 4, "guidance_scale": 1.0, "guidance_scale_2": 1.0}
EULER = {"name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0}
# Visible: the LoRA moves the frames by more than this many uint8 levels somewhere.
MIN_LORA_EFFECT = 10


@pytest.fixture(scope="module")
def lora_files(other_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "peft": peft_lora(root / "peft", other_checkpoint, "transformer"),
        "peft_2": peft_lora(root / "peft_2", other_checkpoint, "transformer_2", seed=5),
        "wan": wan_lora(root / "wan.safetensors", other_checkpoint, "transformer_2"),
        "lightx2v": lightx2v_lora(root / "lightx2v.safetensors", other_checkpoint),
    }


def build(checkpoint: Path, base: str, root: Path, loras=(), solver: dict | None = None) -> Path:
    """`make build` of a shipped deployment with these LoRAs ((file, scale, expert)) and solver; returns REPO."""
    data = Deployment.load(DEPLOYMENTS_DIR / f"{base}.yaml").model_dump(mode="json")
    data["components"]["denoiser"]["loras"] = [
        {"path": str(path), "scale": scale, "expert": expert} for path, scale, expert in loras
    ]
    if solver is not None:
        data["scheduler"] = solver
    root.mkdir(parents=True, exist_ok=True)
    (root / "deployment.json").write_text(json.dumps(data))
    repo = root / "repo"
    args = ["--model", str(checkpoint), "--deployment", str(root / "deployment.json"), "--repo", str(repo)]
    assert build_main([*args, "--artifacts-root", str(root.parent / "artifacts")]) == 0
    return repo


def served_frames(repo: Path, call: dict) -> np.ndarray:
    """What the repository's scheduler would serve: its recorded deployment (LoRAs with their SHA-256, solver) run
    in-process on the graphs rendered into the repository."""
    deployment = Deployment.model_validate_json((repo / "wan_t2v_scheduler" / DEPLOYMENT_FILE).read_text())
    ckpt = Checkpoint.open(deployment.checkpoint, deployment.components.denoiser.loras, deployment.scheduler)
    graphs = repo.parent / "graphs"
    graphs.mkdir(exist_ok=True)
    for graph in repo.glob("*/1/*.onnx*"):
        if not (graphs / graph.name).exists():
            os.symlink(graph, graphs / graph.name)
    pipe = LocalPipeline.load(ckpt, deployment, graphs)
    request = validated_request(deployment, spatial_multiple=ckpt.spatial_multiple, **call)
    return pipe.generate(request)


def _case(lora_files, name: str):
    f = lora_files
    return {
        "peft-high": ([(f["peft"], 0.8, "transformer")], None, CALL),
        "wan-low": ([(f["wan"], 1.2, "transformer_2")], None, CALL),
        "lightx2v-both": ([(f["lightx2v"], 1.0, "both")], None, CALL),
        "stacked": ([(f["peft"], 0.7, "transformer"), (f["wan"], -0.9, "both")], None, CALL),
        "distill-euler": ([(f["peft"], 0.6, "transformer"), (f["peft_2"], 0.6, "transformer_2")], EULER, DISTILL_CALL),
    }[name]


def _check(checkpoint: Path, repo: Path, loras, solver, call) -> None:
    ours = served_frames(repo, call)
    ref = reference_frames(checkpoint, loras, solver, **dict(call))
    assert_frames_close(ours, ref)
    without = reference_frames(checkpoint, (), solver, **dict(call))
    assert np.abs(ref.astype(np.int16) - without).max() > MIN_LORA_EFFECT, "the LoRA does not change the frames"


@pytest.mark.parametrize("case", ["peft-high", "wan-low", "lightx2v-both", "stacked", "distill-euler"])
def test_torch_engine_matches_diffusers(other_checkpoint, lora_files, tmp_path, case):
    loras, solver, call = _case(lora_files, case)
    _check(
        other_checkpoint, build(other_checkpoint, "cpu_torch", tmp_path / "build", loras, solver), loras, solver, call
    )


def test_repository_records_each_lora(other_checkpoint, lora_files, tmp_path):
    from wan_triton.model.lora import file_sha256

    loras = [(lora_files["peft"], 0.5, "transformer"), (lora_files["wan"], 1.5, "both")]
    repo = build(other_checkpoint, "cpu_torch", tmp_path / "b", loras, EULER)
    recorded = json.loads((repo / "wan_t2v_scheduler" / DEPLOYMENT_FILE).read_text())
    assert [
        (Path(r["path"]).name, r["sha256"], r["scale"], r["expert"])
        for r in recorded["components"]["denoiser"]["loras"]
    ] == [(Path(p).name, file_sha256(p), s, e) for p, s, e in loras]
    assert recorded["scheduler"] == EULER


def test_solver_override(other_checkpoint):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from wan_triton.config.deployment import SolverConfig
    from wan_triton.model.checkpoint import CheckpointError

    plain = Checkpoint.open(other_checkpoint).make_solver()
    assert isinstance(plain, UniPCMultistepScheduler) and plain.config.flow_shift == 5.0
    euler = Checkpoint.open(other_checkpoint, solver=SolverConfig(**EULER)).make_solver()
    assert isinstance(euler, FlowMatchEulerDiscreteScheduler) and euler.config.shift == 5.0
    unipc = SolverConfig(name="UniPCMultistepScheduler", flow_shift=3.0)
    assert Checkpoint.open(other_checkpoint, solver=unipc).make_solver().config.flow_shift == 3.0
    # diffusers would silently keep Euler's shift at 1.0 given flow_shift: refused, naming the key.
    bad = [
        (SolverConfig(name="FlowMatchEulerDiscreteScheduler", flow_shift=5.0), "flow_shift"),
        (SolverConfig(name="NoSuchScheduler"), "NoSuchScheduler"),
        (SolverConfig(name="WanPipeline"), "WanPipeline"),
        (SolverConfig(name="DDIMScheduler"), "not a flow-matching"),
    ]
    for solver, message in bad:
        with pytest.raises(CheckpointError, match=message):
            Checkpoint.open(other_checkpoint, solver=solver).make_solver()


def test_guidance_one_runs_one_branch(other_checkpoint, lora_files, tmp_path):
    """At guidance 1.0 on both experts every expert call gets one row (no unconditional branch), warm-up too."""
    from factories import load_deployment
    from wan_triton.components import warm_up_denoiser
    from wan_triton.pipeline import encode_prompts

    deployment = load_deployment("cpu_torch")
    ckpt = Checkpoint.open(other_checkpoint)
    pipe = LocalPipeline.load(ckpt, deployment, Path("/nonexistent"))
    batches: list[int] = []
    for engine in pipe.denoiser.experts.values():
        original = engine.run
        engine.run = lambda inputs, _run=original: batches.append(len(inputs["hidden_states"])) or _run(inputs)
    request = validated_request(deployment, spatial_multiple=ckpt.spatial_multiple, **DISTILL_CALL)
    pipe.denoiser(request, encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a fox runs"]))
    assert batches == [1] * DISTILL_CALL["num_inference_steps"]
    # Two such requests batched together: one row each.
    from wan_triton.model.denoise import BatchItem

    batches.clear()
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a fox runs"])
    other = validated_request(deployment, spatial_multiple=ckpt.spatial_multiple, **{**DISTILL_CALL, "seed": 9})
    results = pipe.denoiser.run_batch([BatchItem(request, embeds), BatchItem(other, embeds)])
    assert all(not isinstance(r, BaseException) for r in results)
    assert batches == [2] * DISTILL_CALL["num_inference_steps"]
    batches.clear()
    warm_up_denoiser(pipe.denoiser, 16, 16, 1, guided=False)
    assert batches == [1, 1]


# --- bad adapters fail the build, and leave REPO as it was --------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _bad_files(checkpoint: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    import pickle

    import torch
    from safetensors.torch import load_file, save_file

    root.mkdir(parents=True, exist_ok=True)
    good = peft_lora(root / "good", checkpoint, "transformer")
    state = load_file(str(good))
    pickled = root / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"x": 1}))
    # Another model's adapter (Flux block names): no key matches a layer of the expert.
    foreign = root / "foreign.safetensors"
    save_file(
        {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 24),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(24, 4),
        },
        str(foreign),
    )
    # Half of it matches the expert and half does not: must not half-apply.
    half = root / "half.safetensors"
    save_file(
        {
            **state,
            "transformer.blocks.0.attn1.to_q_img.lora_A.weight": torch.randn(4, 24),
            "transformer.blocks.0.attn1.to_q_img.lora_B.weight": torch.randn(24, 4),
        },
        str(half),
    )
    ranks = root / "ranks.safetensors"
    key = "transformer.blocks.0.attn1.to_q.lora_B.weight"
    save_file({**state, key: state[key][:, :3].contiguous()}, str(ranks))
    width = root / "width.safetensors"
    key_a = "transformer.blocks.1.ffn.net.0.proj.lora_A.weight"
    save_file({**state, key_a: torch.randn(4, 7)}, str(width))
    return {
        "missing": (root / "nope.safetensors", "not found"),
        "pickle": (pickled, "not a safetensors file"),
        "foreign": (foreign, "single_transformer_blocks.0.attn.to_q"),
        "half": (half, "to_q_img"),
        "rank": (ranks, "blocks.0.attn1.to_q"),
        "shape": (width, "blocks.1.ffn.net.0.proj"),
    }


@pytest.mark.parametrize("bad", ["missing", "pickle", "foreign", "half", "rank", "shape", "scale-nan", "scale-9"])
def test_bad_adapter_fails_the_build_and_leaves_repo(other_checkpoint, lora_files, tmp_path, capsys, bad):
    files = _bad_files(other_checkpoint, tmp_path / "files")
    if bad.startswith("scale"):
        loras, message = [(lora_files["peft"], float(bad.removeprefix("scale-")), "transformer")], "scale"
    else:
        path, message = files[bad]
        loras = [(lora_files["wan"], 1.0, "transformer_2"), (path, 1.0, "transformer")]
    data = Deployment.load(DEPLOYMENTS_DIR / "cpu_torch.yaml").model_dump(mode="json")
    data["components"]["denoiser"]["loras"] = [{"path": str(p), "scale": s, "expert": e} for p, s, e in loras]
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(data))
    repo = tmp_path / "repo"
    args = ["--model", str(other_checkpoint), "--repo", str(repo), "--artifacts-root", str(tmp_path / "artifacts")]
    # Absent stays absent.
    capsys.readouterr()
    assert build_main([*args, "--deployment", str(bad_file)]) == 1
    err = capsys.readouterr().err
    assert message in err and (bad.startswith("scale") or Path(loras[-1][0]).name in err), err
    assert not repo.exists()
    # An existing good repository stays byte for byte.
    assert build_main([*args, "--deployment", str(DEPLOYMENTS_DIR / "cpu_torch.yaml")]) == 0
    before = _tree(repo)
    assert build_main([*args, "--deployment", str(bad_file)]) == 1
    assert _tree(repo) == before


def test_bad_solver_fails_the_build(other_checkpoint, tmp_path, capsys):
    data = Deployment.load(DEPLOYMENTS_DIR / "cpu_torch.yaml").model_dump(mode="json")
    data["scheduler"] = {"name": "FlowMatchEulerDiscreteScheduler", "flow_shift": 5.0}
    (tmp_path / "d.json").write_text(json.dumps(data))
    args = ["--model", str(other_checkpoint), "--deployment", str(tmp_path / "d.json"), "--repo", str(tmp_path / "r")]
    assert build_main([*args, "--artifacts-root", str(tmp_path / "a")]) == 1
    assert "flow_shift" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_export_cache_and_shard_fingerprint_key_on_loras_and_solver(other_checkpoint, lora_files, tmp_path):
    """A rebuild with other adapters (content, scale, expert) or another solver never reuses the exported graphs,
    and TP shards cut with other adapters are refused."""
    import shutil

    from factories import SHAPE_LIMITS
    from wan_build.export_onnx import source_hash
    from wan_triton.config.deployment import LoraConfig, SolverConfig
    from wan_triton.model.specs import denoiser_spec
    from wan_triton.parallel.tp_shards import fingerprint

    def keys(loras=(), solver=None) -> tuple[str, str, str]:
        ckpt = Checkpoint.open(other_checkpoint, tuple(loras), solver)
        return (
            source_hash(ckpt, "transformer", [denoiser_spec(ckpt, SHAPE_LIMITS, "transformer")]),
            source_hash(ckpt, "transformer_2", [denoiser_spec(ckpt, SHAPE_LIMITS, "transformer_2")]),
            fingerprint(ckpt, "transformer"),
        )

    other_content = tmp_path / "copy.safetensors"
    shutil.copy(lora_files["wan"], other_content)
    wan_lora(other_content, other_checkpoint, "transformer", seed=9)
    base = LoraConfig(path=str(lora_files["wan"]), scale=1.0, expert="transformer")
    variants = [
        (),
        (base,),
        (base.model_copy(update={"scale": 0.5}),),
        (base.model_copy(update={"path": str(other_content)}),),
        (base, LoraConfig(path=str(lora_files["peft"]), expert="transformer")),
    ]
    high = [keys(v)[0] for v in variants]
    assert len(set(high)) == len(high)
    assert len({keys(v)[2] for v in variants}) == len(variants)
    # A LoRA on the high-noise expert leaves the low-noise expert's graph as it was; `both` changes it.
    assert keys((base,))[1] == keys()[1] != keys((base.model_copy(update={"expert": "both"}),))[1]
    assert keys(solver=SolverConfig(**EULER))[0] != keys()[0]


def test_random_weight_checkpoint_takes_a_random_lora(other_checkpoint, tmp_path):
    """A configs-only benchmark checkpoint (random weights built at load) takes a LoRA too, made by
    `wan_build.random_lora` in the published distill layout: the weight change of a layer is scale x alpha / rank x
    up @ down, and layers the file does not touch are unchanged."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from wan_build.random_lora import make_random_lora
    from wan_triton.config.deployment import LoraConfig
    from wan_triton.model import lora
    from wan_triton.model.random_init import MARKER

    root = tmp_path / "configs_only"
    shutil.copytree(other_checkpoint, root)
    for weights in root.rglob("*.safetensors"):
        weights.unlink()
    (root / MARKER).write_text("benchmark\n")
    config = json.loads((root / "transformer_2" / "config.json").read_text())
    path = make_random_lora(config, tmp_path / "distill.safetensors", rank=8, std=0.1)
    item = LoraConfig(path=str(path), scale=0.5, expert="transformer_2")
    lora.validate((item,), {"transformer_2": config})

    def load(loras):
        torch.manual_seed(0)  # the same random weights both times
        return Checkpoint.open(root, loras).load_transformer("transformer_2", torch.float32)

    plain, fused = load(()), load((item,))
    tensors = load_file(str(path))
    down = tensors["diffusion_model.blocks.1.cross_attn.o.lora_down.weight"].float()
    up = tensors["diffusion_model.blocks.1.cross_attn.o.lora_up.weight"].float()
    delta = fused.blocks[1].attn2.to_out[0].weight - plain.blocks[1].attn2.to_out[0].weight
    torch.testing.assert_close(delta, 0.5 * (8 / 8) * up @ down, rtol=1e-3, atol=1e-5)
    assert torch.equal(fused.proj_out.weight, plain.proj_out.weight)
    assert not any("lora" in name for name, _ in fused.named_parameters())


def test_keys_diffusers_drops_are_dropped_and_listed(other_checkpoint, lora_files, caplog):
    """LightX2V's zero norm `diff` keys are dropped by diffusers' converter: dropped here too, and named in the
    build log; keys outside `transformer.` (which diffusers' loader skips) likewise."""
    import logging

    import torch
    from safetensors.torch import load_file, save_file

    from wan_triton.config.deployment import LoraConfig
    from wan_triton.model import lora

    adapter = lora.read_adapter(lora_files["lightx2v"])
    assert not any("norm3" in key for key in adapter.state_dict)
    config = json.loads((other_checkpoint / "transformer" / "config.json").read_text())
    with caplog.at_level(logging.INFO, logger="wan_triton.model.lora"):
        lora.validate((LoraConfig(path=str(lora_files["lightx2v"]), expert="transformer"),), {"transformer": config})
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == config["num_layers"] and all("norm3.diff" in m for m in dropped), dropped

    path = lora_files["peft"].with_name("with_text_encoder.safetensors")
    save_file({**load_file(str(lora_files["peft"])), "text_encoder.x.lora_A.weight": torch.zeros(2, 2)}, str(path))
    assert any(key.startswith("text_encoder.x") for key in lora.read_adapter(path).dropped)


def test_tp_shards_are_cut_from_the_fused_weights(tiny4_checkpoint, tmp_path):
    """With LoRAs, each expert's tp shards put back together are the fused expert's weights; the manifest records
    each LoRA (file, SHA-256, scale, expert), and shards cut with other LoRAs are refused."""
    import torch
    from safetensors.torch import load_file

    from wan_triton.config.deployment import LoraConfig
    from wan_triton.config.plan import ParallelPlan, PlanError
    from wan_triton.model.lora import file_sha256
    from wan_triton.parallel.tp_shards import read_manifest, split_dim, write_tp_shards

    path = wan_lora(tmp_path / "wan4.safetensors", tiny4_checkpoint, "transformer_2")
    item = LoraConfig(path=str(path), scale=0.7, expert="transformer_2", sha256=file_sha256(path))
    ckpt = Checkpoint.open(tiny4_checkpoint, (item,))
    plan = ParallelPlan(tp=2)
    folder = write_tp_shards(ckpt, plan, "float32", tmp_path / "tp2")
    manifest = read_manifest(folder, ckpt, plan, "float32")
    assert manifest["experts"]["transformer"]["loras"] == []
    assert manifest["experts"]["transformer_2"]["loras"] == [
        {"file": "wan4.safetensors", "sha256": item.sha256, "scale": 0.7, "expert": "transformer_2"}
    ]
    fused = ckpt.load_transformer("transformer_2").state_dict()
    shards = [load_file(str(folder / "transformer_2" / f"tp{j}-of-2.safetensors")) for j in range(2)]
    for name, tensor in fused.items():
        dim = split_dim(name)
        whole = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim)
        assert torch.equal(whole, tensor), name
    with pytest.raises(PlanError, match="other weights"):
        read_manifest(
            folder, Checkpoint.open(tiny4_checkpoint, (item.model_copy(update={"scale": 0.5}),)), plan, "float32"
        )
