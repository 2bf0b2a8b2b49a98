"""Rendering the model repository: every template key filled, wiring consistent, nothing overwritten by surprise."""

from __future__ import annotations

import re

import pytest

from factories import load_deployment
from wan_build import render
from wan_build.render import RenderError, fill, render_repository
from wan_triton.config.deployment import Deployment
from wan_triton.serving import model_io


def test_unfilled_template_key_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "t.pbtxt").write_text('name: "${model_name}"\nkind: ${instance_kind}\n')
    monkeypatch.setattr(render, "TEMPLATES", tmp_path)
    with pytest.raises(RenderError, match="instance_kind"):
        fill("t.pbtxt", {"model_name": "x"})


def test_every_ensemble_input_is_produced_upstream():
    made = {io.name for io in model_io.REQUEST_INPUTS}
    producers = model_io.producers()
    for step in model_io.STEPS:
        for io in step.inputs:
            name = io.name if step is model_io.PREPROCESS else model_io.ensemble_tensor(producers[io.name], io)
            assert name in made, f"{step.role} reads {name}, which nothing before it produces"
        made |= {model_io.ensemble_tensor(step, io) for io in step.outputs}
    assert {o.name for o in model_io.RESPONSE_OUTPUTS} <= made


def _step_maps(ensemble_config: str, role: str) -> tuple[dict[str, str], dict[str, str]]:
    """The input_map and output_map (key: value) of the ensemble step that runs `<model>_<role>`."""
    step = re.search(r'model_name: "\w+_' + role + r'"(.*?)\n  }', ensemble_config, re.S).group(1)
    maps = [dict(re.findall(kind + r' { key: "(\w+)" value: "(\w+)" }', step)) for kind in ("input_map", "output_map")]
    return maps[0], maps[1]


@pytest.mark.parametrize("encode_while_decoding", [False, True])
def test_the_frames_pass_through_postprocess_only_where_it_encodes(tmp_path, encode_while_decoding):
    deployment = load_deployment("cpu_torch")
    video = deployment.video.model_copy(update={"encode_while_decoding": encode_while_decoding})
    repo = render_repository(deployment.model_copy(update={"video": video}), tmp_path, tmp_path, tmp_path / "repo")
    ensemble = (repo / "wan_t2v/config.pbtxt").read_text()
    _, decoder_out = _step_maps(ensemble, "vae_decoder")
    post_in, post_out = _step_maps(ensemble, "postprocess")
    if encode_while_decoding:
        # The response's frames come from the decoder; postprocess hands on the MP4 alone.
        assert decoder_out == {"decoded_frames": "frames", "decoded_video": "_decoded_video"}
        assert post_in == {"request": "_request", "decoded_video": "_decoded_video"}
        assert post_out == {"video": "video"}
    else:
        assert decoder_out == {"decoded_frames": "_decoded_frames", "decoded_video": "_decoded_video"}
        assert post_in == {
            "request": "_request",
            "decoded_frames": "_decoded_frames",
            "decoded_video": "_decoded_video",
        }
        assert post_out == {"video": "video", "frames": "frames"}
    # Postprocess declares the frames an optional input, so a wiring without them is valid.
    post_config = (repo / "wan_t2v_postprocess/config.pbtxt").read_text()
    assert re.search(r'name: "decoded_frames"[^}]*optional: true', post_config)


def test_render_torch_repository(tmp_path):
    deployment = load_deployment("cpu_torch")
    repo = render_repository(deployment, tmp_path, tmp_path / "no_graphs_needed", tmp_path / "repo")
    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert names == sorted(["wan_t2v", "wan_t2v_stream"] + [f"wan_t2v_{s.role}" for s in model_io.STEPS])
    for config in repo.glob("*/config.pbtxt"):
        text = config.read_text()
        assert "${" not in text and re.search(r'^name: "wan_t2v', text, re.M)
    # The streaming endpoint is decoupled and sits beside the ensemble, not in it.
    stream_config = (repo / "wan_t2v_stream/config.pbtxt").read_text()
    assert re.search(r"decoupled: true", stream_config)
    assert "wan_t2v_stream" not in (repo / "wan_t2v/config.pbtxt").read_text()
    assert 'name: "job_token"' in (repo / "wan_t2v_scheduler/config.pbtxt").read_text()
    model_py = (repo / "wan_t2v_scheduler/1/model.py").read_text()
    assert "from wan_triton.serving.models.scheduler import Scheduler  #" in model_py
    # Its entry point ends the stub after finalize (wan_triton.serving.stub_exit; tests/platform/test_stub_exit.py).
    assert "class TritonPythonModel(Scheduler):" in model_py and 'end_stub_process("scheduler")' in model_py
    # The model's threads yield to the stub's health thread (serving.model_thread_nice), before the heavy import.
    assert model_py.index("os.nice(5)") < model_py.index("from wan_triton")
    recorded = Deployment.model_validate_json((repo / "wan_t2v_scheduler/deployment.json").read_text())
    assert recorded.checkpoint == str(tmp_path.resolve())
    # Re-rendering replaces an earlier render...
    render_repository(deployment, tmp_path, tmp_path, repo)
    # ...but never a folder it did not make.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "file").write_text("keep")
    with pytest.raises(RenderError, match="not made by this renderer"):
        render_repository(deployment, tmp_path, tmp_path, other)


def test_onnx_repository_needs_exported_graphs(tmp_path):
    deployment = load_deployment("cpu")
    with pytest.raises(RenderError, match="no exported graph"):
        render_repository(deployment, tmp_path, tmp_path / "empty", tmp_path / "repo")


def test_gpu_steps_take_inputs_where_they_are(tmp_path):
    """GPU steps are rendered to receive GPU tensors (DLPack, no host round trip); CPU steps keep host inputs."""
    deployment = load_deployment("gpu_a14b")
    repo = render_repository(deployment, tmp_path, tmp_path, tmp_path / "repo")
    for step in model_io.STEPS:
        text = (repo / f"wan_t2v_{step.role}/config.pbtxt").read_text()
        on_gpu = step.role in ("text_encoder", "scheduler", "vae_decoder")
        assert ("kind: KIND_GPU" in text) == on_gpu, step.role
        assert ('key: "FORCE_CPU_ONLY_INPUT_TENSORS"' in text) == on_gpu, step.role


def test_gpu_deployments_get_a_cuda_memory_pool_for_tensors_between_steps(tmp_path):
    from wan_triton.tritonserver import server as triton_server

    cpu = render_repository(load_deployment("cpu_torch"), tmp_path, tmp_path, tmp_path / "cpu")
    assert triton_server.cuda_memory_pool_bytes([cpu]) == 0
    assert not any("cuda-memory-pool" in a for a in triton_server.server_command([cpu], 1, 2, 3, num_gpus=2))
    gpu_deployment = load_deployment("gpu_a14b")
    assert gpu_deployment.serving.cuda_memory_pool_mib == 1024  # Triton's 64 MiB default lost data at 480p
    gpu = render_repository(gpu_deployment, tmp_path, tmp_path, tmp_path / "gpu")
    pool = triton_server.cuda_memory_pool_bytes([cpu, gpu])
    assert pool == 1024 << 20
    cmd = triton_server.server_command([cpu, gpu], 1, 2, 3, cuda_pool_bytes=pool, num_gpus=2)
    assert [a for a in cmd if "cuda-memory-pool" in a] == [
        f"--cuda-memory-pool-byte-size=0:{pool}",
        f"--cuda-memory-pool-byte-size=1:{pool}",
    ]
