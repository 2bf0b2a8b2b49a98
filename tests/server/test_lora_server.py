"""LoRAs through the real Triton server, in every format diffusers' Wan loader reads (diffusers/PEFT, original Wan /
ComfyUI, LightX2V), stacked three deep over both experts, on both engines: a torch-engine repository with the Euler
solver override, an ONNX Runtime repository (the LoRAs fused before export) with the checkpoint's own solver, and a
tensor-parallel plan (tp 2, gloo worker group, build-time shards cut from the fused weights) with a LoRA on each
expert. Served frames equal diffusers' WanPipeline with the same LoRAs loaded its own way and the same solver."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from checks import assert_frames_close
from factories import DEPLOYMENTS_DIR, build_repository
from lora_files import lightx2v_lora, peft_lora, reference_frames, wan_lora
from served import REQUEST, TEST_EXIT_TIMEOUT_S, infer
from wan_triton.config.deployment import Deployment
from wan_triton.tritonserver.launch import running_server

EULER = {"name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0}
STACKED, ONNX, PARALLEL = "wan_lora", "wan_lora_onnx", "wan_lora_tp2"


@pytest.fixture(scope="module")
def lora_server(other_checkpoint, tiny4_checkpoint, artifacts_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_server")
    # (checkpoint, shipped deployment, solver, LoRAs as (file, scale, expert))
    cases = {
        STACKED: (
            other_checkpoint,
            "cpu_torch",
            EULER,
            [
                (peft_lora(root / "peft", other_checkpoint, "transformer"), 0.8, "transformer"),
                (wan_lora(root / "wan.safetensors", other_checkpoint, "transformer"), 1.1, "both"),
                (lightx2v_lora(root / "lightx2v.safetensors", other_checkpoint, "transformer_2"), 0.7, "transformer_2"),
            ],
        ),
        ONNX: (
            other_checkpoint,
            "cpu",
            None,
            [
                (lightx2v_lora(root / "lightx2v_both.safetensors", other_checkpoint), 0.9, "both"),
                (peft_lora(root / "peft_2", other_checkpoint, "transformer_2", seed=5), 0.6, "transformer_2"),
                (wan_lora(root / "wan_1.safetensors", other_checkpoint, "transformer", seed=4), -0.8, "transformer"),
            ],
        ),
        PARALLEL: (
            tiny4_checkpoint,
            "cpu_parallel",
            EULER,
            [
                (peft_lora(root / "peft4", tiny4_checkpoint, "transformer"), 1.0, "transformer"),
                (wan_lora(root / "wan4.safetensors", tiny4_checkpoint, "transformer_2"), 1.0, "transformer_2"),
            ],
        ),
    }
    repos = {}
    for name, (checkpoint, base, solver, loras) in cases.items():
        data = Deployment.load(DEPLOYMENTS_DIR / f"{base}.yaml").model_dump(mode="json")
        data.update(model_name=name, warmup=[])
        if solver is not None:
            data["scheduler"] = solver
        data["components"]["denoiser"]["loras"] = [{"path": str(p), "scale": s, "expert": e} for p, s, e in loras]
        repos[name] = build_repository(checkpoint, Deployment.model_validate(data), root, artifacts_root)
    # The ONNX graphs carry the LoRAs: the experts were exported from the fused weights.
    assert sorted(p.name for p in repos[ONNX].glob("*_scheduler/1/transformer*.onnx")) == [
        "transformer.onnx",
        "transformer_2.onnx",
    ]
    manifest = json.loads(next(repos[PARALLEL].glob("*/1/tp2-float32/manifest.json")).read_text())
    assert [r["file"] for r in manifest["experts"]["transformer"]["loras"]] == ["adapter.safetensors"]
    assert [r["file"] for r in manifest["experts"]["transformer_2"]["loras"]] == ["wan4.safetensors"]
    with running_server(
        list(repos.values()), root / "tritonserver.log", ready_timeout_s=600, exit_timeout_s=TEST_EXIT_TIMEOUT_S
    ) as running:
        yield running, cases
    assert running.process.returncode == 0, running.shutdown_report()


@pytest.mark.parametrize("model", [STACKED, ONNX, PARALLEL])
def test_served_frames_match_diffusers_with_loras(lora_server, model):
    running, cases = lora_server
    checkpoint, _, solver, loras = cases[model]
    with grpcclient.InferenceServerClient(running.grpc_url) as client:
        frames = infer(client, model, REQUEST, outputs=("frames",)).as_numpy("frames")
    ref = reference_frames(checkpoint, loras, solver, **dict(REQUEST))
    assert_frames_close(frames, ref)
    without = reference_frames(checkpoint, (), solver, **dict(REQUEST))
    assert np.abs(ref.astype(np.int16) - without).max() > 10, "the LoRAs do not change the frames"
