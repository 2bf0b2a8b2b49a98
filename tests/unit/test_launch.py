"""Unit tests for the launcher's reports on a server that did not start or stop cleanly (Triton 2.51's lines)."""

from __future__ import annotations

from wan_triton.tritonserver.launch import RunningServer

LOG = (
    """\
I1124 13:56:48.338681 20666 model_lifecycle.cc:839] "successfully loaded 'wan_onnx_scheduler'"
I1124 13:56:48.524319 20666 model_lifecycle.cc:839] "successfully loaded 'wan_onnx_stream'"
2026-11-24 13:59:03,123 INFO wan_triton.serving.triton: wan_onnx_stream stopped a request: deadline exceeded
Signal (15) received.
I1124 13:59:04.186000 20666 model_lifecycle.cc:624] "successfully unloaded 'wan_onnx_scheduler' version 1"
"""
    + "".join(
        f'I1124 13:59:{t:02d}.000000 20666 server.cc:345] "Timeout {30 - t}: Found 1 live models and 0 in-flight '
        'non-inference requests"\n'
        for t in range(31)
    )
    + 'E1124 13:59:35.000000 20666 main.cc:535] "failed to stop server: Internal - Exit timeout expired."\n'
)


def _server_with_log(tmp_path, text: str) -> RunningServer:
    log = tmp_path / "tritonserver.log"
    log.write_text(text)
    return RunningServer(process=None, http_port=0, grpc_port=0, metrics_port=0, log_path=log)


def test_shutdown_report_names_the_model_that_never_unloaded(tmp_path):
    report = _server_with_log(tmp_path, LOG).shutdown_report(4)
    lines = report.splitlines()
    assert lines[0] == "models never unloaded: wan_onnx_stream"
    # The exit countdown is left out, so the tail still shows what happened before the signal.
    assert lines[1:] == [
        "2026-11-24 13:59:03,123 INFO wan_triton.serving.triton: wan_onnx_stream stopped a request: deadline exceeded",
        "Signal (15) received.",
        LOG.splitlines()[4],
        LOG.splitlines()[-1],
    ]


def test_shutdown_report_of_a_clean_stop_names_none(tmp_path):
    clean_stop = LOG.split("Signal")[0].replace("loaded 'wan_onnx_stream'", "loaded 'x'") + (
        "I1124 13:59:04.2 1 model_lifecycle.cc:624] \"successfully unloaded 'x' version 1\"\n"
        "I1124 13:59:04.2 1 model_lifecycle.cc:624] \"successfully unloaded 'wan_onnx_scheduler' version 1\"\n"
    )
    report = _server_with_log(tmp_path, clean_stop).shutdown_report()
    assert report.splitlines()[0] == "models never unloaded: none"


START_LOG = """\
E1205 04:05:06.910675 13889 server.cc:241] "CudaDriverHelper has not been initialized."
I1205 04:05:06.913761 13889 model_lifecycle.cc:472] "loading: wan_cached_stream:1"
I1205 04:05:06.913915 13889 model_lifecycle.cc:472] "loading: wan_cached_text_encoder:1"
I1205 04:05:06.913925 13889 model_lifecycle.cc:472] "loading: wan_cached_vae_decoder:1"
I1205 04:05:09.122837 13889 python_be.cc:2249] "TRITONBACKEND_ModelInstanceInitialize: wan_cached_stream_0_0 (CPU)"
I1205 04:05:10.000000 13889 model_lifecycle.cc:839] "successfully loaded 'wan_cached_stream'"
E1205 04:05:30.000000 13889 model_lifecycle.cc:641] "failed to load 'wan_cached_vae_decoder' version 1: Internal: boom"
I1205 04:05:31.000000 13889 model_lifecycle.cc:839] "successfully loaded 'wan_cached_text_encoder'"
E1205 04:05:32.000000 13889 ensemble_scheduler.cc:1468] "unable to create stream for wan_cached: no CUDA driver"
"""


def test_startup_report_names_the_model_that_never_loaded_and_its_error(tmp_path):
    report = _server_with_log(tmp_path, START_LOG).startup_report(2)
    lines = report.splitlines()
    assert lines[0] == "models never loaded: wan_cached_vae_decoder"
    # Only the error that explains the start; the lines Triton logs at every start on a host without a GPU are left out.
    assert lines[1:3] == ["errors:", START_LOG.splitlines()[6]]
    assert lines[3:] == ["log tail:", *START_LOG.splitlines()[-2:]]
