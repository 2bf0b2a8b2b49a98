"""A server stops cleanly even when a model's stub would hang after its `finalize`.

Triton 2.51's stub answers the server's finalize request before it runs the model's `finalize`, and the server then
waits for the stub process with no timeout. Whatever blocks the stub's own teardown after `finalize` (its thread
joins; the interpreter's exit, which waits for every non-daemon thread) holds the server until its exit timeout, and
the stop fails. The model.py the build renders ends the stub right after `finalize` (wan_triton.serving.stub_exit).

The teardown is made to hang for real: the model's `finalize` leaves a non-daemon thread that never ends. The same
model is served once behind the rendered model.py's entry point and once as a plain Triton class, which shows that
the hang is real (the stop fails at the exit timeout) and so that the test can fail.
"""

from __future__ import annotations

import re

import pytest

from factories import one_model_repository
from wan_build.render import fill
from wan_triton.tritonserver.launch import start_server

# A model whose finalize returns but leaves a non-daemon thread behind: the interpreter's exit waits for it forever.
LINGERING = """import threading

import triton_python_backend_utils as pb_utils


class Lingering:
    def initialize(self, args):
        pass

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
            for r in requests
        ]

    def finalize(self):
        threading.Thread(target=threading.Event().wait, daemon=False).start()
        print("lingering model finalized", flush=True)
"""


def _entry_point_model_py() -> str:
    """The build's model.py, serving the lingering class in place of a library model."""
    rendered = fill("model.py", {"role": "lingering", "class_name": "Lingering", "nice": "5"})
    library_import = "from wan_triton.serving.models.lingering import Lingering  # noqa: E402\n"
    assert library_import in rendered, "the model.py template no longer imports its class the expected way"
    return rendered.replace(library_import, LINGERING)


@pytest.mark.parametrize("entry_point", ["rendered", "plain"])
def test_a_stub_whose_teardown_hangs_after_finalize_still_lets_the_server_stop(tmp_path, entry_point):
    model_py = _entry_point_model_py() if entry_point == "rendered" else LINGERING + "\nTritonPythonModel = Lingering\n"
    log = tmp_path / "tritonserver.log"
    repo = one_model_repository(tmp_path, "lingering", model_py).parent
    server = start_server([repo], log, ready_timeout_s=120, exit_timeout_s=5)
    returncode = server.stop()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "lingering model finalized" in text, text[-3000:]
    if entry_point == "rendered":
        assert returncode == 0, server.shutdown_report()
        assert re.search(r"successfully unloaded 'lingering'", text), text[-3000:]
    else:
        # Without the entry point the stub never exits: Triton gives up at its exit timeout and the stop fails.
        assert returncode != 0
        assert "Exit timeout expired" in text, text[-3000:]
