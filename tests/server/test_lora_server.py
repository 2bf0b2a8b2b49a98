"""LoRAs through the real Triton server: a torch-engine repository with two stacked LoRAs (diffusers/PEFT on the
high-noise expert, original Wan format on both), and a tensor-parallel plan (tp 2, gloo worker group, build-time
shards cut from the fused weights) with a LoRA on each expert, both with the Euler solver override. Served frames
equal diffusers' WanPipeline with the same LoRAs loaded its own way and the same solver swap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from checks import assert_frames_close
from factories import DEPLOYMENTS_DIR
from lora_files import peft_lora, reference_frames, wan_lora
from served import REQUEST, infer
from wan_build.__main__ import main as build_main
from wan_triton.config.deployment import Deployment
from wan_triton.tritonserver.launch import running_server

EULER = {"name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0}
STACKED, PARALLEL = "wan_lora", "wan_lora_tp2"


@pytest.fixture(scope="module")
def lora_server(other_checkpoint, tiny4_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_server")
    cases = {
        STACKED: (
            other_checkpoint,
            "cpu_torch",
            [
                (peft_lora(root / "peft", other_checkpoint, "transformer"), 0.8, "transformer"),
                (wan_lora(root / "wan.safetensors", other_checkpoint, "transformer"), 1.1, "both"),
            ],
        ),
        PARALLEL: (
            tiny4_checkpoint,
            "cpu_parallel",
            [
                (peft_lora(root / "peft4", tiny4_checkpoint, "transformer"), 1.0, "transformer"),
                (wan_lora(root / "wan4.safetensors", tiny4_checkpoint, "transformer_2"), 1.0, "transformer_2"),
            ],
        ),
    }
    repos = []
    for name, (checkpoint, base, loras) in cases.items():
        data = Deployment.load(DEPLOYMENTS_DIR / f"{base}.yaml").model_dump(mode="json")
        data.update(model_name=name, scheduler=EULER, warmup=[])
        data["components"]["denoiser"]["loras"] = [{"path": str(p), "scale": s, "expert": e} for p, s, e in loras]
        (root / f"{name}.json").write_text(json.dumps(data))
        repo = root / f"repo_{name}"
        args = ["--model", str(checkpoint), "--deployment", str(root / f"{name}.json"), "--repo", str(repo)]
        assert build_main([*args, "--artifacts-root", str(root / "artifacts")]) == 0
        repos.append(repo)
    manifest = json.loads(next(repos[1].glob("*/1/tp2-float32/manifest.json")).read_text())
    assert [r["file"] for r in manifest["experts"]["transformer"]["loras"]] == ["adapter.safetensors"]
    assert [r["file"] for r in manifest["experts"]["transformer_2"]["loras"]] == ["wan4.safetensors"]
    with running_server(repos, root / "tritonserver.log", ready_timeout_s=600) as running:
        yield running, cases
    assert running.process.returncode == 0, running.shutdown_report()


@pytest.mark.parametrize("model", [STACKED, PARALLEL])
def test_served_frames_match_diffusers_with_loras(lora_server, model):
    running, cases = lora_server
    checkpoint, _, loras = cases[model]
    with grpcclient.InferenceServerClient(running.grpc_url) as client:
        frames = infer(client, model, REQUEST, outputs=("frames",)).as_numpy("frames")
    ref = reference_frames(checkpoint, loras, EULER, **dict(REQUEST))
    assert_frames_close(frames, ref)
    without = reference_frames(checkpoint, (), EULER, **dict(REQUEST))
    assert np.abs(ref.astype(np.int16) - without).max() > 10, "the LoRAs do not change the frames"
