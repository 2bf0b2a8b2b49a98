"""A start survives Triton's Python backend taking a loading model's stub for dead.

While a model instance initialises, Triton 2.51's Python backend expects its stub to set a health flag every
second; a stub that misses that (frozen by a loaded host) is taken for dead: the backend frees the arguments it sent
the stub and waits for it to exit. What follows depends on where the stub was (docs/triton-2.51-notes.md):
- still importing its model.py: on resuming it reads the freed arguments, crashes holding the shared memory's
  mutex, and tritonserver aborts (`boost::interprocess::lock_exception`);
- in its `initialize`: it carries on and never exits, and the load would hang; the launcher
  (wan_triton.tritonserver.server) kills the stub Triton waits on, and the load fails ("not healthy").
Either way `start_server` starts the server again, and the second start is ready.

The stub is frozen for real (SIGSTOP for 2.5 s, well past the one-second health check) in the first start of a
one-model repository, whose model.py sleeps in the chosen phase while a marker file exists.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from factories import one_model_repository
from wan_triton.tritonserver.launch import STUB_TAKEN_FOR_DEAD, start_server

FREEZE_S = 2.5
# The model sleeps this long in the frozen phase, so the freeze ends before the phase does.
PHASE_S = 4.0

MODEL = f"""import os
import time
from pathlib import Path

import triton_python_backend_utils as pb_utils

MODEL_DIR = Path(__file__).resolve().parents[1]


def _slow_first_start(phase):
    marker = MODEL_DIR / f"slow_{{phase}}"
    if marker.exists():
        marker.unlink()
        (MODEL_DIR / "stub.pid").write_text(str(os.getpid()))
        time.sleep({PHASE_S})


_slow_first_start("import")


class TritonPythonModel:
    def initialize(self, args):
        _slow_first_start("initialize")

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
            for r in requests
        ]
"""


def _repository(root: Path, phase: str) -> tuple[Path, Path]:
    model_dir = one_model_repository(root, "slow", MODEL)
    (model_dir / f"slow_{phase}").touch()
    return model_dir.parent, model_dir


def _freeze_the_slow_stub(pid_file: Path, frozen: list[int]) -> None:
    deadline = time.monotonic() + 120
    while not pid_file.exists():
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    time.sleep(0.3)
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGSTOP)
    time.sleep(FREEZE_S)
    os.kill(pid, signal.SIGCONT)
    frozen.append(pid)


@pytest.mark.parametrize(
    "phase, first_start_shows",
    [
        # The stub may die or live on: the arguments it reads were freed, what it finds there varies.
        ("import", STUB_TAKEN_FOR_DEAD.pattern),
        ("initialize", r"Stub process 'slow_0_0' is not healthy"),
    ],
)
def test_a_start_whose_loading_stub_was_taken_for_dead_is_started_again(tmp_path, phase, first_start_shows):
    repo, model_dir = _repository(tmp_path, phase)
    frozen: list[int] = []
    freezer = threading.Thread(target=_freeze_the_slow_stub, args=(model_dir / "stub.pid", frozen))
    freezer.start()
    log = tmp_path / "tritonserver.log"
    try:
        server = start_server([repo], log, ready_timeout_s=120, exit_timeout_s=5, attempts=2)
    finally:
        freezer.join()
    try:
        assert frozen, "the slow stub never started"
        assert server.is_ready()
        first = (tmp_path / "tritonserver.attempt1.log").read_text(encoding="utf-8", errors="replace")
        assert re.search(first_start_shows, first), first[-3000:]
        if phase == "initialize":
            # The load ended because the launcher killed the stub Triton waited on, not by a timeout.
            assert "killing the stub, so the load fails" in first, first[-3000:]
        assert not STUB_TAKEN_FOR_DEAD.search(log.read_text(encoding="utf-8", errors="replace"))
    finally:
        assert server.stop() == 0, server.shutdown_report()


def test_a_start_that_fails_for_another_reason_is_not_started_again(tmp_path):
    repo, model_dir = _repository(tmp_path, "never")
    model = model_dir / "1" / "model.py"
    model.write_text(model.read_text().replace('_slow_first_start("initialize")', 'raise ValueError("no model here")'))
    log = tmp_path / "tritonserver.log"
    with pytest.raises(RuntimeError, match="no model here"):
        start_server([repo], log, ready_timeout_s=120, exit_timeout_s=5, attempts=2)
    assert not (tmp_path / "tritonserver.attempt1.log").exists()
