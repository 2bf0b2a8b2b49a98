"""CUDA graphs around a parallel rank's forward, collectives included (NCCL); skipped without CUDA (CPU CI).

- One GPU: NCCL groups of one rank are put where a plan puts its Ulysses and tensor-parallel groups, so the
  forward calls every collective a rank calls (all-to-alls around attention, all-reduces after the row-parallel
  projections and in the q/k norms, the all-gather of the output tokens) through torch's NCCL process group
  inside the capture. What this checks: that torch's NCCL path captures and replays, bit-identical to eager.
  What it cannot: traffic between GPUs (a one-rank communicator moves nothing).
- One GPU: the ranks' stop agreement (a gloo group) works beside an NCCL world.
- Two or more GPUs: the served worker group with and without `cuda_graphs` gives bit-identical latents for each
  plan of world size 2 (and ulysses2 with its exchanges in 2 head groups), a graphed group stops a request
  mid-loop and then serves the next one as before, and the VAE decode split over 2 GPUs gives one GPU's frames
  (within 1 uint8 level).

    python -m pytest tests/gpu/test_gpu_parallel.py
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from checks import assert_self_attention_one_group_ahead, logged_stops
from factories import GPU_REQUEST as REQUEST
from factories import make_embeds
from wan_triton.config.deployment import ComponentConfig
from wan_triton.config.plan import ParallelPlan
from wan_triton.model.checkpoint import Checkpoint

COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather")


def _one_rank_capture(rank: int, checkpoint: Path, compile_blocks: bool, head_groups: int = 1) -> dict:
    """In a one-rank NCCL world: an expert cut for a plan whose Ulysses and TP groups are that world; eager and
    graphed outputs for three inputs of one shape, and how many collectives one eager forward calls. With
    `head_groups`, the Ulysses exchanges are started a group ahead of their waits (functional collectives)."""
    import torch.distributed as dist

    from wan_triton.parallel import ulysses
    from wan_triton.parallel.process_groups import PlanGroups
    from wan_triton.parallel.sharding import parallelize, shard_tensor_parallel
    from wan_triton.runtime.engines.cuda_graph import CudaGraphEngine
    from wan_triton.runtime.experts import compile_expert_blocks, torch_engines

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    ckpt = Checkpoint.open(checkpoint)
    module = ckpt.load_transformer("transformer", torch.bfloat16, str(device))
    world = dist.group.WORLD
    shard_tensor_parallel(module, 0, 1, world)  # row-parallel layers and distributed norms over a 1-rank group
    module._wan_tp_sharded = True
    plan = ParallelPlan()
    parallelize(module, PlanGroups(plan, 0, plan.coords(0), None, world, world), "cudnn", device, head_groups)
    if compile_blocks:
        compile_expert_blocks(module, parallel=True)  # as a parallel rank compiles (parallel.rank)
    eager, graphed = torch_engines(module, device, torch.bfloat16, cuda_graphs=True, parallel=True)
    assert isinstance(graphed, CudaGraphEngine) and not graphed.eager_fallback

    gen = torch.Generator().manual_seed(1)

    def inputs() -> dict[str, torch.Tensor]:
        return {
            "hidden_states": torch.randn(1, 16, 3, 8, 12, generator=gen).to(device),
            "timestep": torch.tensor([float(torch.randint(0, 1000, (1,), generator=gen))], device=device),
            "encoder_hidden_states": torch.randn(1, 512, ckpt.text_dim, generator=gen).to(device, torch.bfloat16),
        }

    calls = dict.fromkeys(COLLECTIVES, 0)
    if not compile_blocks:  # dynamo traces the collectives as functional ops: Python-level counting sees none
        real = {name: getattr(dist, name) for name in COLLECTIVES}

        def counting(name):
            def call(*args, **kwargs):
                calls[name] += 1
                return real[name](*args, **kwargs)

            return call

        for name in COLLECTIVES:
            setattr(dist, name, counting(name))
        started = ulysses._start_all_to_all
        if head_groups > 1:  # the grouped exchanges do not go through dist.all_to_all_single
            real["all_to_all_single"] = started
            ulysses._start_all_to_all = counting("all_to_all_single")
        eager.run(inputs())
        for name in COLLECTIVES:
            setattr(dist, name, real[name])
        ulysses._start_all_to_all = started
    codes = []
    if compile_blocks:  # the first run compiles: keep the generated code of the blocks that exchange
        from torch._inductor.utils import run_and_get_code

        _, codes = run_and_get_code(eager.run, inputs())
        codes = [code for code in codes if "all_to_all_single" in code]
    pairs = []
    for _ in range(3):
        x = inputs()
        pairs.append((graphed.run(x)["noise_pred"].cpu(), eager.run(x)["noise_pred"].cpu()))
    captured = [key for key, graph in graphed.graphs.items() if graph is not None]
    return {"pairs": pairs, "captured": len(captured), "calls": calls, "codes": codes}


@pytest.mark.parametrize("head_groups", [1, 2], ids=["whole-exchanges", "2-head-groups"])
@pytest.mark.parametrize("compile_blocks", [False, True], ids=["eager-blocks", "compiled-blocks"])
def test_nccl_collectives_replay_in_a_cuda_graph(tiny4_checkpoint, compile_blocks, head_groups):
    from wan_triton.workers.world import run_world

    args = (tiny4_checkpoint, compile_blocks, head_groups)
    result = run_world(1, _one_rank_capture, args, backend="nccl")[0]
    assert result["captured"] == 1
    if not compile_blocks:
        # The forward went through every kind of collective the plans use (so the capture held them).
        assert all(n > 0 for n in result["calls"].values()), result["calls"]
    for graphed, eager in result["pairs"]:
        assert torch.isfinite(eager).all()
        assert torch.equal(graphed, eager)
    assert not torch.equal(result["pairs"][0][0], result["pairs"][1][0])  # the replays saw new inputs
    if compile_blocks:
        # The blocks compiled for CUDA keep each group's exchange started ahead of the previous group's attention.
        assert result["codes"]
        for code in result["codes"]:
            assert_self_attention_one_group_ahead(code, head_groups)


def _stop_agreement_beside_nccl(rank: int) -> list[int | None]:
    """In an NCCL world: the ranks' stop agreement (a gloo group of its own) goes on while the flag is clear and
    stops once it is set."""
    import multiprocessing as mp

    from wan_triton.workers.step_agreement import StepAgreement, StopRequested

    flag = mp.get_context("spawn").Event()
    agreement = StepAgreement(flag)
    seen = []
    for steps_done in (1, 2):
        try:
            agreement.check(steps_done)
            seen.append(None)
        except StopRequested as stop:
            seen.append(stop.steps_done)
        flag.set()
    return seen


def test_stop_agreement_runs_beside_an_nccl_world():
    from wan_triton.workers.world import run_world

    assert run_world(1, _stop_agreement_beside_nccl, backend="nccl") == [[None, 2]]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_worker_group_stops_mid_loop_with_cuda_graphs(tiny4_checkpoint, caplog):
    import logging

    from wan_triton.serving.stopping import RequestStopped
    from wan_triton.workers.supervisor import WorkerGroup

    ckpt = Checkpoint.open(tiny4_checkpoint)
    cfg = ComponentConfig(
        engine="torch", device="cuda", precision="bfloat16", attention="cudnn", parallel={"cfg": 2}, cuda_graphs=True
    )
    long = replace(REQUEST, num_inference_steps=500)

    def stop_after_step_2(index: int, count: int) -> None:
        if index >= 1:
            raise RequestStopped("cancelled", "request cancelled")

    group = WorkerGroup(ckpt, cfg, device_ids=(0, 1))
    group.start()
    try:
        expected = group(REQUEST, make_embeds(ckpt.text_dim))
        pids = group.pids
        with caplog.at_level(logging.INFO, logger="wan_triton.workers.supervisor"), pytest.raises(RequestStopped):
            group(long, make_embeds(ckpt.text_dim), on_step=stop_after_step_2)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        stops = logged_stops(logged)
        assert len(stops) == 1 and stops[0] < 250, logged  # of 500
        assert group.pids == pids and group.healthy()
        assert torch.equal(group(REQUEST, make_embeds(ckpt.text_dim)), expected)  # the graphs replay as before
    finally:
        group.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(
    ("plan", "head_groups"),
    [({"cfg": 2}, 1), ({"ulysses": 2}, 1), ({"tp": 2}, 1), ({"ulysses": 2}, 2)],
    ids=["cfg2", "ulysses2", "tp2", "ulysses2-2-head-groups"],
)
def test_worker_group_with_cuda_graphs_matches_eager(tiny4_checkpoint, plan, head_groups):
    """With 2 head groups the exchanges are started ahead of their waits: NCCL runs them beside the attention
    (what the tiny model cannot show is the time that saves)."""
    from wan_triton.workers.supervisor import WorkerGroup

    ckpt = Checkpoint.open(tiny4_checkpoint)
    latents = {}
    for graphs in (False, True):
        cfg = ComponentConfig(
            engine="torch",
            device="cuda",
            precision="bfloat16",
            attention="cudnn",
            parallel=plan,
            ulysses_head_groups=head_groups,
            cuda_graphs=graphs,
        )
        group = WorkerGroup(ckpt, cfg, device_ids=(0, 1))
        group.start()
        try:
            # Twice: the first call captures, the second replays.
            latents[graphs] = [group(REQUEST, make_embeds(ckpt.text_dim)) for _ in range(2)]
        finally:
            group.close()
    assert torch.isfinite(latents[False][0]).all()
    for run in (0, 1):
        assert torch.equal(latents[True][run], latents[False][0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_vae_split_over_two_gpus_matches_one(tiny4_checkpoint):
    import numpy as np

    from wan_triton.components import build_vae_decoder

    ckpt = Checkpoint.open(tiny4_checkpoint)
    cfg = ComponentConfig(engine="torch", device="cuda", precision="float32")
    latents = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(2))
    expected = build_vae_decoder(ckpt, cfg, Path("/nonexistent")).frames(latents)
    group = build_vae_decoder(ckpt, cfg.model_copy(update={"split_width": 2}), Path("/nonexistent"))
    try:
        assert np.abs(group.frames(latents).astype(int) - expected.astype(int)).max() <= 1
    finally:
        group.close()
