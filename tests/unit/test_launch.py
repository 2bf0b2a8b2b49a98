"""Unit tests for the launcher's report on a server that did not stop cleanly (the lines are Triton 2.51's)."""

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


def test_shutdown_report_names_the_model_that_never_unloaded(tmp_path):
    log = tmp_path / "tritonserver.log"
    log.write_text(LOG)
    report = RunningServer(process=None, http_port=0, grpc_port=0, metrics_port=0, log_path=log).shutdown_report(4)
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
    log = tmp_path / "tritonserver.log"
    log.write_text(
        LOG.split("Signal")[0].replace("loaded 'wan_onnx_stream'", "loaded 'x'")
        + (
            "I1124 13:59:04.2 1 model_lifecycle.cc:624] \"successfully unloaded 'x' version 1\"\n"
            "I1124 13:59:04.2 1 model_lifecycle.cc:624] \"successfully unloaded 'wan_onnx_scheduler' version 1\"\n"
        )
    )
    report = RunningServer(process=None, http_port=0, grpc_port=0, metrics_port=0, log_path=log).shutdown_report()
    assert report.splitlines()[0] == "models never unloaded: none"
