"""One worker process of a group: joins the process group, loads its shard of both experts, then serves
requests from its pipe until told to stop.

Messages in: ("denoise", request fields, prompt embeddings as numpy), ("warm_up", height, width, num_frames),
("stop",). Messages out: ("ready",), ("step", index, count) from rank 0, ("done", latents numpy on rank 0 else
None), ("error", traceback text).
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

import torch

from ..deployment import ComponentConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start; picklable, sent to each spawned process."""

    checkpoint: str
    denoiser: ComponentConfig
    port: int
    device_ids: tuple[int, ...]  # CUDA device of each rank; unused on cpu
    shards: str | None = None  # build-time TP shard folder (wan_build.shards), None: cut the whole expert here

    @property
    def world_size(self) -> int:
        return self.denoiser.parallel.world_size


def _device(spec: WorkerSpec, rank: int) -> torch.device:
    if spec.denoiser.device == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", spec.device_ids[rank])
    torch.cuda.set_device(device)
    return device


def worker_main(rank: int, spec: WorkerSpec, conn) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    from pathlib import Path

    from ..checkpoint import Checkpoint
    from ..denoise import warm_up
    from ..request import GenerationRequest
    from .groups import create_groups
    from .rank import build_rank_denoiser
    from .world import backend_for, cpu_threads_per_rank, init_distributed

    try:
        device = _device(spec, rank)
        backend = backend_for(device.type)
        threads = cpu_threads_per_rank(spec.world_size) if backend == "gloo" else None
        init_distributed(rank, spec.world_size, spec.port, backend, threads)
        groups = create_groups(spec.denoiser.parallel)
        shards = None if spec.shards is None else Path(spec.shards)
        denoiser = build_rank_denoiser(Checkpoint.open(spec.checkpoint), spec.denoiser, groups, device, shards)
        conn.send(("ready",))
    except Exception:  # noqa: BLE001 - the supervisor reports it and fails the load
        conn.send(("error", traceback.format_exc()))
        return

    def on_step(index: int, count: int) -> None:
        if rank == 0:
            conn.send(("step", index, count))

    while True:
        try:
            message = conn.recv()
        except EOFError:  # the supervisor is gone (its process ended): nothing left to serve
            break
        try:
            match message[0]:
                case "stop":
                    break
                case "denoise":
                    _, fields, embeds = message
                    latents = denoiser(GenerationRequest(**fields), torch.from_numpy(embeds), on_step)
                    conn.send(("done", latents.float().cpu().numpy() if rank == 0 else None))
                case "warm_up":
                    _, height, width, num_frames = message
                    warm_up(denoiser, height, width, num_frames)
                    conn.send(("done", None))
                case other:
                    raise ValueError(f"unknown message {other!r}")
        except Exception:  # noqa: BLE001 - a failed collective leaves the group unusable: the supervisor rebuilds it
            conn.send(("error", traceback.format_exc()))
    torch.distributed.destroy_process_group()
