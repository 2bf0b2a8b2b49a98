"""One worker process of a group: joins the process group, builds its part of the model, then serves requests from
its pipe until told to stop.

Roles: "denoiser" (its shard of both experts, for the plan's rank) and "vae" (the VAE decoder, split by width over
the group: wan_triton.parallel.vae_split).

Messages in: ("denoise", request fields, prompt embeddings as numpy, whether to send estimates) or ("decode", latents
as numpy), ("warm_up", height, width, num_frames, guided), ("stop",). Messages out: ("ready",), ("step", index,
count) and, when asked, ("estimate", index, the clean estimate's first latent frame as numpy) from rank 0,
("done", latents or uint8 frames as numpy on rank 0 else None), ("stopped", steps done) when the ranks agreed to
stop a request mid-loop (wan_triton.workers.step_agreement), ("error", traceback text).
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from wan_triton.config.deployment import ComponentConfig, LoraConfig, SolverConfig
from wan_triton.config.precision import DTYPES
from wan_triton.config.request import GenerationRequest
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.denoise import latent_shape, warm_up
from wan_triton.model.vae import VaeDecoder
from wan_triton.parallel.process_groups import create_groups
from wan_triton.parallel.vae_split import split_decode_fn, split_vae_decoder
from wan_triton.workers.rank import build_rank_denoiser
from wan_triton.workers.step_agreement import StepAgreement, StopRequested
from wan_triton.workers.world import backend_for, cpu_threads_per_rank, init_distributed

logger = logging.getLogger(__name__)

Role = Literal["denoiser", "vae"]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start; picklable, sent to each spawned process."""

    checkpoint: str
    component: ComponentConfig
    port: int
    device_ids: tuple[int, ...]  # CUDA device of each rank; unused on cpu
    shards: str | None = None  # build-time TP shard folder (wan_build.shards), None: cut the whole expert here
    fp8_weights: str | None = None  # build-time FP8 weights (runtime.fp8_weights), None: quantize at load
    role: Role = "denoiser"
    loras: tuple[LoraConfig, ...] = ()  # fused into the experts as they load (Checkpoint.loras)
    solver: SolverConfig | None = None  # the deployment's solver override (Checkpoint.solver)

    @property
    def world_size(self) -> int:
        return worker_count(self.component, self.role)


def worker_count(cfg: ComponentConfig, role: Role) -> int:
    return cfg.parallel.world_size if role == "denoiser" else cfg.split_width


def _device(spec: WorkerSpec, rank: int) -> torch.device:
    if spec.component.device == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", spec.device_ids[rank])
    torch.cuda.set_device(device)
    return device


def _build_vae(spec: WorkerSpec, ckpt, device: torch.device):
    """This rank's VaeDecoder: the VAE split by width over the whole (default) group; video on rank 0."""
    dtype = DTYPES[spec.component.precision]
    vae = split_vae_decoder(ckpt.load_vae(dtype, str(device)), dist.group.WORLD)
    return VaeDecoder(ckpt, split_decode_fn(vae, dist.group.WORLD), device, dtype)


def worker_main(rank: int, spec: WorkerSpec, conn, stop_flag) -> None:
    """`stop_flag`: the supervisor's multiprocessing Event, set when the request under way must stop."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    try:
        device = _device(spec, rank)
        backend = backend_for(device.type)
        threads = cpu_threads_per_rank(spec.world_size) if backend == "gloo" else None
        init_distributed(rank, spec.world_size, spec.port, backend, threads)
        ckpt = Checkpoint.open(spec.checkpoint, spec.loras, spec.solver)
        agreement = None
        if spec.role == "vae":
            denoiser, vae = None, _build_vae(spec, ckpt, device)
        else:
            agreement = StepAgreement(stop_flag)
            groups = create_groups(spec.component.parallel)
            shards = None if spec.shards is None else Path(spec.shards)
            fp8_folder = None if spec.fp8_weights is None else Path(spec.fp8_weights)
            denoiser, vae = build_rank_denoiser(ckpt, spec.component, groups, device, shards, fp8_folder), None
        conn.send(("ready",))
    except Exception:  # noqa: BLE001 - the supervisor reports it and fails the load
        conn.send(("error", traceback.format_exc()))
        return

    def on_step(index: int, count: int) -> None:
        if rank == 0:
            conn.send(("step", index, count))
        if agreement is not None:
            agreement.check(index + 1)

    def on_estimate(index: int, clean_latents: torch.Tensor) -> None:
        # The first latent frame only (one video frame, what a preview decodes): under 1 MB at 720p.
        conn.send(("estimate", index, clean_latents[:, :, :1].float().cpu().numpy()))

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
                    _, fields, embeds, estimate_every, image = message  # estimate_every 0: no estimates wanted
                    request, hook = GenerationRequest(**fields), on_estimate if estimate_every and rank == 0 else None
                    try:
                        every = max(estimate_every, 1)
                        latents = denoiser(request, torch.from_numpy(embeds), on_step, hook, every, image)
                    except StopRequested as stop:  # every rank stops after the same step: the group stays usable
                        conn.send(("stopped", stop.steps_done))
                    else:
                        conn.send(("done", latents.float().cpu().numpy() if rank == 0 else None))
                case "decode":
                    # Every rank decodes its strip; rank 0 gets the frames (None elsewhere). uint8 frames, not the
                    # float video: a quarter of the bytes through the pipe (224 MB at 720p).
                    conn.send(("done", vae.frames(torch.from_numpy(message[1]))))
                case "warm_up" if vae is not None:
                    _, height, width, num_frames, *_ = message
                    vae(torch.zeros(latent_shape(ckpt, height, width, num_frames)))
                    conn.send(("done", None))
                case "warm_up":
                    _, height, width, num_frames, guided = message
                    warm_up(denoiser, height, width, num_frames, guided)
                    conn.send(("done", None))
                case other:
                    raise ValueError(f"unknown message {other!r}")
        except Exception:  # noqa: BLE001 - a failed collective leaves the group unusable: the supervisor rebuilds it
            conn.send(("error", traceback.format_exc()))
    torch.distributed.destroy_process_group()
