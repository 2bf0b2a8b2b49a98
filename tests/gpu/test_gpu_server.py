"""A Triton server with every component on the GPU (the tiny checkpoint, cpu_torch.yaml moved to CUDA): it serves a
unary and a streamed request, then stops with exit code 0 and no crash in its log (a Python-backend stub that
segfaults at unload leaves the exit code alone; wan_triton.serving.metrics says why it once did)."""

from __future__ import annotations

import tritonclient.grpc as grpcclient

from checks import assert_no_crash_in_log
from factories import DEPLOYMENTS_DIR
from served import Stream, infer

MODEL = "wan_gpu"
REQUEST = dict(prompt="a lantern on a pier", seed=9, height=32, width=48, num_frames=5, num_inference_steps=4)


def test_gpu_server_serves_and_stops_cleanly(other_checkpoint, tmp_path):
    from wan_build.__main__ import main as build_main
    from wan_triton.config.deployment import Deployment
    from wan_triton.tritonserver.launch import running_server

    deployment = Deployment.load(DEPLOYMENTS_DIR / "cpu_torch.yaml")
    components = deployment.components.model_copy(
        update={
            name: getattr(deployment.components, name).model_copy(update={"device": "cuda"})
            for name in ("text_encoder", "denoiser", "vae_decoder")
        }
    )
    deployment = deployment.model_copy(update={"model_name": MODEL, "components": components})
    dep_file = tmp_path / "deployment.json"
    dep_file.write_text(deployment.to_json())
    repo = tmp_path / "repo"
    args = ["--model", str(other_checkpoint), "--deployment", str(dep_file), "--repo", str(repo)]
    assert build_main([*args, "--artifacts-root", str(tmp_path / "artifacts")]) == 0
    with running_server([repo], tmp_path / "tritonserver.log", ready_timeout_s=600) as running:
        with grpcclient.InferenceServerClient(running.grpc_url) as client:
            unary = infer(client, MODEL, REQUEST, outputs=("frames",)).as_numpy("frames")
        stream = Stream(running.grpc_url, f"{MODEL}_stream")
        stream.send(REQUEST)
        _, final = stream.until_final()
        stream.close()
        assert unary.shape == (5, 32, 48, 3)
        assert final.as_numpy("frames").tobytes() == unary.tobytes()
    assert running.process.returncode == 0, running.shutdown_report()
    assert_no_crash_in_log(running.log_path)
