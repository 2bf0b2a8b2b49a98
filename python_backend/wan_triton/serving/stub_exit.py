"""The end of a Triton Python-backend stub process, once its model has finalized.

Triton 2.51's stub answers the server's finalize request before it runs the model's `finalize`; the server then
waits (`waitpid`, no timeout) for the stub process to end. After `finalize` the stub joins its own threads, and that
join can block for good: seen on a GPU host in 4 of 9 stops of one server, where a model's `finalize` had returned
(its "unloaded" line is in the log) and the stub's main thread sat in `std::thread::join` while its health thread
kept running. The server then hits its exit timeout and stops with a failure. Nothing the stub does after `finalize`
is needed by the server (it already has the answer, and it owns the shared memory), so the model's entry point ends
the process here instead (docs/triton-2.51-notes.md, "A stub that never exits").
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

logger = logging.getLogger(__name__)


def end_stub_process(role: str) -> NoReturn:
    """Flush what this process logged and end it at once, with no interpreter teardown."""
    logger.info("%s model: its stub process ends after finalize", role)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing left to flush
            pass
    os._exit(0)
