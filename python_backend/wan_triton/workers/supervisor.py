"""Worker groups: one process per rank, living across requests. The scheduler model runs the denoiser's
(`WorkerGroup`, one process per rank of the plan); the vae_decoder model runs the VAE's when the deployment splits
the decode (`VaeWorkerGroup`).

Each request goes to every worker; rank 0's result comes back (latents, or frames). The supervisor waits on the
workers' pipes and process sentinels together, so a worker that dies mid-request (killed, out of memory, a crashed
kernel) fails that request at once with a clear error instead of hanging on its peers' collectives; the rest of the
group is stopped and a fresh group is started before the next request. A worker that hangs without dying (stuck in
a collective, stopped) fails the request once no rank has reported progress for the deployment's
`worker_stall_timeout_s`, and the group is restarted the same way. A request stopped by its step hook (cancelled,
past its deadline) stops every rank after the same step (wan_triton.workers.step_agreement) and the group stays up.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch

from wan_triton.config.deployment import ComponentConfig
from wan_triton.config.plan import num_tokens
from wan_triton.config.request import GenerationRequest, InvalidRequestError
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.denoise import BatchItem
from wan_triton.workers.worker import Role, WorkerSpec, worker_count, worker_main
from wan_triton.workers.world import free_port

logger = logging.getLogger(__name__)

# After a rank reports an error, how long to wait for a peer's exit to show before blaming the reporting rank.
# A peer killed mid-collective is reaped within milliseconds once its threads are gone; a genuine error on a
# healthy group costs this much extra before the request fails.
PEER_EXIT_GRACE_S = 2.0


class WorkerGroupError(RuntimeError):
    """A worker died or failed; the in-flight request is lost and the group is rebuilt before the next one."""

    def __init__(self, message: str, worker_gone: bool = False) -> None:
        super().__init__(message)
        self.worker_gone = worker_gone  # the worker exited (or its pipe broke), rather than reporting an error


def _python_executable() -> str:
    """The interpreter to spawn workers with. Inside Triton's Python backend stub `sys.executable` is the stub
    binary, not Python; the venv's interpreter sits beside the site-packages the stub runs with."""
    exe = Path(sys.executable)
    if exe.name.startswith("python"):
        return str(exe)
    return str(Path(sys.prefix) / "bin" / "python3")


class _Supervisor:
    """Starts, watches and restarts a group of worker processes (one role) and runs messages on all of them."""

    role: Role

    def __init__(
        self,
        ckpt: Checkpoint,
        cfg: ComponentConfig,
        device_ids: tuple[int, ...] = (),
        shards: Path | None = None,
        fp8_weights: Path | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        self.world_size = worker_count(cfg, self.role)
        if cfg.device == "cuda" and len(device_ids) != self.world_size:
            raise ValueError(f"{self.label_of(cfg)} needs {self.world_size} GPUs, got device ids {device_ids}")
        self.ckpt = ckpt
        self.cfg = cfg
        self.label = self.label_of(cfg)
        self.device_ids = tuple(device_ids)
        self.shards = shards
        self.fp8_weights = fp8_weights
        self.start_timeout_s = start_timeout_s
        self.stall_timeout_s = cfg.worker_stall_timeout_s
        self._procs: list = []
        self._conns: list = []
        self._stop_flag = None  # shared with the workers: set when the request under way must stop
        self.generation = 0  # how many times the group has been started

    @classmethod
    def label_of(cls, cfg: ComponentConfig) -> str:
        raise NotImplementedError

    # Lifecycle

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def healthy(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    @property
    def restarts(self) -> int:
        """How often the group was started again after its first start (a worker died or hung)."""
        return max(self.generation - 1, 0)

    def start(self) -> None:
        self.close()
        ctx = mp.get_context("spawn")
        ctx.set_executable(_python_executable())
        spec = WorkerSpec(
            checkpoint=str(self.ckpt.root),
            component=self.cfg,
            port=free_port(),
            device_ids=self.device_ids,
            shards=None if self.shards is None else str(self.shards),
            fp8_weights=None if self.fp8_weights is None else str(self.fp8_weights),
            role=self.role,
            loras=self.ckpt.loras,
            solver=self.ckpt.solver,
        )
        started = time.perf_counter()
        self._stop_flag = ctx.Event()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(rank, spec, child, self._stop_flag), name=f"wan-{self.role}-rank{rank}"
            )
            proc.daemon = True
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self.generation += 1
        self._collect("starting", lambda rank, msg: msg[0] == "ready", self.start_timeout_s)
        logger.info("%s started (pids %s) in %.1f s", self.label, self.pids, time.perf_counter() - started)

    def close(self) -> None:
        """Stop every worker: politely when idle, killed when not."""
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        # Dropping the processes and the flag lets the flag's semaphores be unlinked now: inside Triton's stub they
        # would otherwise outlive the interpreter and be reported at shutdown as leaked (resource_tracker).
        self._procs, self._conns, self._stop_flag = [], [], None

    def _fail(self, message: str, worker_gone: bool = False) -> WorkerGroupError:
        logger.error("%s: %s; stopping it (restarted before the next request)", self.label, message)
        self.close()
        return WorkerGroupError(message, worker_gone)

    def warm_up(self, height: int, width: int, num_frames: int, guided: bool = True) -> None:
        """Every rank runs its part once at this shape (compiles, captures, allocates) before serving."""
        self._send(("warm_up", height, width, num_frames, guided))

    def _send(self, message: tuple, on_step=None, on_estimate=None):
        """Run `message` on every rank and return rank 0's result; `on_step(index, count)` and
        `on_estimate(index, first latent frame of the clean estimate)` see what rank 0 reports.

        A worker that died between requests can still look alive when the next request arrives: a killed
        multi-threaded process is reaped only once all its threads have exited, so `is_alive()` stays True for a
        moment after the kill (measured: a request sent right after a SIGKILL found the group "healthy" and then
        failed, or its peer's first collective failed on it). So when a worker turns out to be gone before any rank
        reported a step of this request, the group is rebuilt and the request sent once more; a worker lost
        mid-request fails the request.
        """
        for attempt in (1, 2):
            progressed: list[bool] = []
            try:
                return self._run(message, on_step, on_estimate, progressed)
            except WorkerGroupError as exc:
                if attempt == 2 or progressed or not exc.worker_gone:
                    raise
                logger.warning(
                    "%s: a worker was gone before the request started; rebuilt, sending it again",
                    self.label,
                )
        raise AssertionError("unreachable")

    def _run(self, message: tuple, on_step, on_estimate, progressed: list[bool]):
        if not self.healthy():
            if self._procs:
                logger.warning("%s lost a worker; restarting it", self.label)
            self.start()
        self._stop_flag.clear()
        for rank, conn in enumerate(self._conns):
            try:
                conn.send(message)
            except OSError as exc:
                raise self._fail(f"{self.role} worker rank {rank} is gone ({exc})", worker_gone=True) from None
        results: dict[int, object] = {}
        stopped: list[BaseException] = []
        steps_done: dict[int, int] = {}

        def accept(rank: int, msg: tuple) -> bool:
            progressed.append(True)
            if msg[0] in ("step", "estimate"):
                hook, argument = (on_step, msg[2]) if msg[0] == "step" else (on_estimate, torch.from_numpy(msg[2]))
                if hook is not None and not stopped:
                    try:
                        hook(msg[1], argument)
                    except Exception as exc:  # noqa: BLE001 - raised once every rank has stopped
                        stopped.append(exc)
                        # The ranks cannot leave mid-step (their peers would wait in its collectives): they agree
                        # after each step whether the flag is set (wan_triton.workers.step_agreement) and stop together.
                        self._stop_flag.set()
                return False
            if msg[0] == "stopped":
                steps_done[rank] = msg[1]
                return True
            results[rank] = msg[1]
            return True

        self._collect("running a request", accept, timeout_s=None, stall_timeout_s=self.stall_timeout_s)
        if steps_done:
            logger.info("%s: the ranks stopped the request after step %d", self.label, max(steps_done.values()))
        if stopped:
            raise stopped[0]
        if steps_done:  # no hook asked for it: only this supervisor sets the flag, so this is a bug
            raise self._fail(f"the ranks stopped after step {steps_done} without a request to stop")
        return results[0]

    def _collect(self, doing: str, accept, timeout_s: float | None, stall_timeout_s: float | None = None) -> None:
        """Read messages until `accept(rank, message)` returned True once per rank; fail on a dead worker, an
        error message, the timeout, or `stall_timeout_s` without any message."""
        pending = set(range(len(self._procs)))
        by_handle = {}
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True)):
            by_handle[conn] = ("conn", rank)
            by_handle[proc.sentinel] = ("proc", rank)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_message = time.monotonic()
        while pending:
            limits = []
            if deadline is not None:
                limits.append(deadline - time.monotonic())
            if stall_timeout_s is not None:
                limits.append(last_message + stall_timeout_s - time.monotonic())
            ready = wait(list(by_handle), timeout=max(0.0, min(limits)) if limits else None)
            if not ready:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise self._fail(f"no answer from ranks {sorted(pending)} within {timeout_s} s while {doing}")
                if stall_timeout_s is not None and now >= last_message + stall_timeout_s:
                    raise self._fail(
                        f"no progress from {self.role} worker ranks {sorted(pending)} for {stall_timeout_s} s while "
                        f"{doing} (a rank is hung, e.g. in a collective; worker_stall_timeout_s); the request "
                        "failed and the worker group will be restarted before the next request"
                    )
                continue  # the wait returned a little early
            last_message = time.monotonic()
            # Messages first: a worker that answered and then exited is not a failure of this request.
            for handle in sorted(ready, key=lambda h: by_handle[h][0] != "conn"):
                kind, rank = by_handle[handle]
                if kind == "conn":
                    try:
                        msg = handle.recv()
                    except (EOFError, OSError):
                        del by_handle[handle]  # its sentinel reports the exit
                        continue
                    if msg[0] == "error":
                        self._raise_for_gone_peer(rank, doing)
                        raise self._fail(f"{self.role} worker rank {rank} failed while {doing}:\n{msg[1]}")
                    try:
                        if accept(rank, msg):
                            pending.discard(rank)
                    except BaseException:
                        self.close()  # e.g. a cancelled request: the workers are mid-loop
                        raise
                else:
                    raise self._gone(rank, doing)

    def _gone(self, rank: int, doing: str) -> WorkerGroupError:
        proc = self._procs[rank]
        proc.join(timeout=1)
        return self._fail(
            f"{self.role} worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode} while "
            f"{doing}; the request failed and the worker group will be restarted before the next request",
            worker_gone=True,
        )

    def _raise_for_gone_peer(self, reporting_rank: int, doing: str, grace_s: float = PEER_EXIT_GRACE_S) -> None:
        """A rank's error is often its collective failing because a peer died (gloo: "connection reset"; NCCL:
        a remote error), and it can arrive before the dead peer's exit is seen. The dead peer is the cause: name
        it, and mark the failure as a lost worker (so a request that had not started yet is sent again)."""
        others = {self._procs[r].sentinel: r for r in range(len(self._procs)) if r != reporting_rank}
        ready = wait(list(others), timeout=grace_s)
        if ready:
            raise self._gone(min(others[h] for h in ready), doing)


class WorkerGroup(_Supervisor):
    """The denoiser of a parallel plan, Denoiser-like: `group(request, prompt_embeds, on_step)` returns the final
    latents, as `Denoiser` does."""

    role = "denoiser"

    def __init__(self, ckpt: Checkpoint, cfg: ComponentConfig, *args, **kwargs) -> None:
        for expert in filter(ckpt.has_expert, ("transformer", "transformer_2")):
            cfg.parallel.check_transformer(ckpt.config(expert), cfg.ulysses_head_groups)
        super().__init__(ckpt, cfg, *args, **kwargs)
        self.plan = cfg.parallel

    @classmethod
    def label_of(cls, cfg: ComponentConfig) -> str:
        return f"denoiser worker group {cfg.parallel}"

    def __call__(
        self,
        request: GenerationRequest,
        prompt_embeds: torch.Tensor,
        on_step=None,
        on_estimate=None,
        estimate_every: int = 1,
        condition_image: np.ndarray | None = None,
    ) -> torch.Tensor:
        """`condition_image`: uint8 [height, width, 3] or None (`BatchItem.condition_image`); every rank encodes it.
        `on_estimate` gets the first latent frame of the clean estimate after steps k, 2k, ... (k:
        `estimate_every`), float32 [1, C, 1, h, w] (what a preview shows), not the whole estimate: rank 0 sends it
        through its pipe only for those steps, and only when a hook wants it."""
        self.check_request(request)
        fields, embeds = dataclasses.asdict(request), prompt_embeds.float().cpu().numpy()
        every = estimate_every if on_estimate is not None else 0  # 0: no estimates
        latents = self._send(("denoise", fields, embeds, every, condition_image), on_step, on_estimate)
        return torch.from_numpy(latents)

    def run_batch(self, items: list[BatchItem]) -> list[torch.Tensor | BaseException]:
        """`Denoiser.run_batch` for the scheduler model: the group denoises one request at a time."""
        results: list[torch.Tensor | BaseException] = []
        for item in items:
            try:
                args = (item.request, item.prompt_embeds, item.on_step, item.on_estimate, item.estimate_every)
                results.append(self(*args, condition_image=item.condition_image))
            except Exception as exc:  # noqa: BLE001 - that request's error; the others go on
                results.append(exc)
        return results

    def check_request(self, request: GenerationRequest) -> None:
        """The token sequence must split evenly over the ulysses ranks (no padding): INVALID_ARG otherwise."""
        ckpt, u = self.ckpt, self.cfg.parallel.ulysses
        sp = ckpt.vae_scale_factor_spatial
        tokens = num_tokens(
            ckpt.num_latent_frames(request.num_frames), request.height // sp, request.width // sp, ckpt.patch_size
        )
        if tokens % u:
            raise InvalidRequestError(
                "height, width, num_frames",
                f"this deployment splits the video's {tokens} tokens (latent frames x height/16 x width/16) over "
                f"{u} sequence-parallel ranks; choose a size whose token count is divisible by {u}",
            )


class VaeWorkerGroup(_Supervisor):
    """The VAE decoder split by width over `split_width` processes (wan_triton.parallel.vae_split), VaeDecoder-like
    for the serving model: `group.frames(latents)` returns rank 0's uint8 frames [F, H, W, 3]."""

    role = "vae"

    @classmethod
    def label_of(cls, cfg: ComponentConfig) -> str:
        return f"VAE worker group (width split over {cfg.split_width})"

    def frames(self, latents: torch.Tensor) -> np.ndarray:
        return self._send(("decode", latents.float().cpu().numpy()))
