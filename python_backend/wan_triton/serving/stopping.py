"""Stopping a request early (client cancellation, per-request deadlines) and reporting its progress, between the
scheduler's denoising loop and the stream model.

The scheduler's loop calls hooks after every step (`Denoiser.run_batch`, `BatchItem.on_step`); `StepGuard.check`
raises `RequestStopped` there, which drops the request from its batch and frees its latents while the others go on.

The stream model and the scheduler are separate processes of one host, and Triton 2.51 gives neither a way to reach
the other mid-request: a BLS caller cannot cancel the request it sent, and a composing model of an ensemble never
sees its client's cancellation (measured: `is_cancelled()` stayed False through a cancelled unary ensemble call).
So they share a `JobBoard`: small files per request, named by a random token the stream model makes. The scheduler
reads the cancel flag and writes the step it finished and, when asked, the clean-latent estimate for a preview.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

StopReason = Literal["cancelled", "deadline"]


class RequestStopped(Exception):
    """The request was stopped before it finished: cancelled, or past its `timeout_s` deadline."""

    def __init__(self, reason: StopReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_TOKEN = re.compile(r"[0-9a-f]{32}")
# Begins the message of a request stopped at its deadline (the stream model recognises it in a step's error).
DEADLINE_MESSAGE = "timeout_s: deadline exceeded"


@dataclass(frozen=True)
class Progress:
    step: int  # steps finished
    num_steps: int


class JobBoard:
    """Per-request files shared by the processes of one host, under one fixed folder, named by the request's token.

    The token is a random UUID the stream model makes per request; anything else is refused, so no request can
    name a path. Files live in RAM-backed /dev/shm where it exists. Writes go through a temporary file and a rename,
    so a reader sees a whole file or the previous one.
    """

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
            root = base / f"wan_triton_jobs_{os.getuid()}"
        self.root = root

    @staticmethod
    def new_token() -> str:
        return uuid.uuid4().hex

    @staticmethod
    def check_token(token: str) -> str:
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"job token must be 32 lowercase hex digits, got {token!r}")
        return token

    def _path(self, token: str, kind: str) -> Path:
        return self.root / f"{self.check_token(token)}.{kind}"

    def _write(self, path: Path, data: bytes) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)

    def cancel(self, token: str) -> None:
        self._write(self._path(token, "cancel"), b"")

    def is_cancelled(self, token: str) -> bool:
        return self._path(token, "cancel").exists()

    def set_progress(self, token: str, step: int, num_steps: int) -> None:
        self._write(self._path(token, "progress"), f"{step} {num_steps}".encode())

    def progress(self, token: str) -> Progress | None:
        try:
            step, num_steps = self._path(token, "progress").read_text().split()
        except (FileNotFoundError, ValueError):
            return None
        return Progress(int(step), int(num_steps))

    def set_preview(self, token: str, step: int, clean_latents: np.ndarray) -> None:
        """`clean_latents`: float32 [1, C, 1, h, w], the clean estimate of one latent frame after `step` steps."""
        header = np.array([step], dtype=np.int64).tobytes()
        shape = np.array(clean_latents.shape, dtype=np.int64)
        payload = np.array([shape.size], dtype=np.int64).tobytes() + shape.tobytes()
        self._write(self._path(token, "preview"), header + payload + np.ascontiguousarray(clean_latents).tobytes())

    def take_preview(self, token: str) -> tuple[int, np.ndarray] | None:
        """The newest preview not taken yet, as (step, float32 [1, C, 1, h, w]), or None."""
        path = self._path(token, "preview")
        try:
            data = path.read_bytes()
            path.unlink()
        except FileNotFoundError:
            return None
        step = int(np.frombuffer(data[:8], dtype=np.int64)[0])
        ndim = int(np.frombuffer(data[8:16], dtype=np.int64)[0])
        shape = tuple(int(d) for d in np.frombuffer(data[16 : 16 + 8 * ndim], dtype=np.int64))
        return step, np.frombuffer(data[16 + 8 * ndim :], dtype=np.float32).reshape(shape)

    def clear(self, token: str) -> None:
        for kind in ("cancel", "progress", "preview"):
            self._path(token, kind).unlink(missing_ok=True)


@dataclass
class StepGuard:
    """Whether one request may go on: raises RequestStopped once it is cancelled or past its deadline."""

    timeout_s: float | None = None
    deadline_unix_s: float | None = None
    cancelled: list[Callable[[], bool]] = field(default_factory=list)  # any True stops the request
    clock: Callable[[], float] = time.time

    def check(self, where: str) -> None:
        """`where` ends the message, e.g. "after step 3 of 10"."""
        if any(is_cancelled() for is_cancelled in self.cancelled):
            raise RequestStopped("cancelled", f"request cancelled {where}")
        if self.deadline_unix_s is not None and self.clock() > self.deadline_unix_s:
            raise RequestStopped("deadline", f"{DEADLINE_MESSAGE}: the request's {self.timeout_s:g} s passed {where}")
