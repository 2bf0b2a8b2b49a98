"""Ulysses exchanges in head groups (`ulysses.attend_head_groups`, the deployment's `ulysses_head_groups`), on CPU
with gloo ranks: the attention is the whole sequence's, each group's all-to-all is started one group ahead of its
wait both eagerly and in the compiled blocks, and a tiny expert gives the same output as with one group. Settings
that cannot split: tests/unit/test_parallel_settings.py."""

from __future__ import annotations

from pathlib import Path

import torch

from checks import assert_one_group_ahead, assert_self_attention_one_group_ahead, calls_in, sdpa
from wan_triton.config.plan import ParallelPlan
from wan_triton.model.checkpoint import Checkpoint


def _grouped_attention(rank: int) -> dict:
    """Each rank holds 8 of 16 tokens with all 8 heads. For 1, 2 and 4 groups: the output and the order in which
    exchanges are started, waited for and attention is run; 4 groups compiled as a parallel rank's blocks are."""
    import torch.distributed as dist
    from torch._inductor.utils import run_and_get_code

    from wan_triton.parallel import ulysses
    from wan_triton.runtime.experts import OVERLAP_COMPILE_OPTIONS

    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 8, 8, 16, generator=gen) for _ in range(3))  # [B, S/p, H, D]
    whole = [torch.empty_like(x) for x in (q, k, v) for _ in range(2)]
    for i, x in enumerate((q, k, v)):
        dist.all_gather(whole[2 * i : 2 * i + 2], x)
    qw, kw, vw = (torch.cat(whole[2 * i : 2 * i + 2], dim=1) for i in range(3))
    expected = sdpa(qw, kw, vw)[:, rank * 8 : (rank + 1) * 8]  # the whole sequence's, this rank's tokens

    start, wait = ulysses._start_all_to_all, ulysses._wait
    events: list[str] = []
    ids: dict[int, str] = {}

    def logged_start(chunks, g):
        out = start(chunks, g)
        ids[id(out)] = f"{len(ids)}"
        events.append(f"start {ids[id(out)]}")
        return out

    def logged_wait(t):
        events.append(f"wait {ids[id(t)]}")
        return wait(t)

    def logged_attend(*qkv):
        events.append("attend")
        return sdpa(*qkv)

    ulysses._start_all_to_all, ulysses._wait = logged_start, logged_wait
    out = {"expected": expected}
    for n in (1, 2, 4):
        events.clear()
        ids.clear()
        chunks = (ulysses.head_chunks(x, 2, n).unbind(0) for x in (q, k, v))
        out[n] = ulysses.attend_head_groups(*chunks, logged_attend, group)
        out[f"events{n}"] = list(events)
    ulysses._start_all_to_all, ulysses._wait = start, wait

    def grouped(q, k, v):
        return ulysses.attend_head_groups(*(ulysses.head_chunks(x, 2, 4).unbind(0) for x in (q, k, v)), sdpa, group)

    compiled = torch.compile(grouped, fullgraph=True, options=OVERLAP_COMPILE_OPTIONS)
    out["compiled"], out["code"] = run_and_get_code(compiled, q, k, v)
    return out


def test_head_groups_attend_the_whole_sequence_and_start_each_exchange_one_group_ahead():
    from wan_triton.workers.world import run_world

    for rank in run_world(2, _grouped_attention):
        for n in (1, 2, 4):
            torch.testing.assert_close(rank[n], rank["expected"], rtol=1e-5, atol=1e-5)
        assert rank["events1"] == ["attend"]  # one group: the blocking exchanges, as before
        # Two groups: Q, K, V of group 1 (exchanges 3-5) leave before group 0 is attended, and group 0's output
        # (6) before group 1 is; only then is anything of group 1 waited for.
        assert rank["events2"] == [
            *(f"start {i}" for i in range(6)),
            *(f"wait {i}" for i in range(3)),
            "attend",
            "start 6",
            *(f"wait {i}" for i in range(3, 6)),
            "attend",
            "start 7",
            "wait 6",
            "wait 7",
        ]
        assert_one_group_ahead(["attend" if e == "attend" else e.split()[0] for e in rank["events4"]], 4)
        torch.testing.assert_close(rank["compiled"], rank["expected"], rtol=1e-5, atol=1e-5)
        assert_one_group_ahead(calls_in(rank["code"][0]), 4)


def _tiny_expert_runs(rank: int, checkpoint: Path) -> dict:
    """A ulysses2 rank's tiny expert (2 local heads): forward outputs with 1 and 2 head groups, eager (both Q/K
    layouts) and through the compiled blocks as a parallel rank compiles them, with the compiled code."""
    from torch._inductor.utils import run_and_get_code

    from wan_triton.parallel import sharding as parallel_model
    from wan_triton.parallel.process_groups import create_groups
    from wan_triton.runtime.experts import compile_expert_blocks

    groups = create_groups(ParallelPlan(ulysses=2))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 8, generator=gen)  # 2 latent frames x 2 x 4 tokens after the 1x2x2 patch
    text = torch.randn(1, 512, Checkpoint.open(checkpoint).text_dim, generator=gen)
    out = {}
    for n in (1, 2):
        module = Checkpoint.open(checkpoint).load_transformer("transformer")
        parallel_model.parallelize(module, groups, "reference", torch.device("cpu"), ulysses_head_groups=n)
        processors = {id(p): p for p in module.attn_processors.values()}.values()

        def forward(module=module) -> torch.Tensor:
            with torch.no_grad():
                return module(x, torch.tensor([700]), text, return_dict=False)[0]

        out[n] = forward()
        for processor in processors:
            processor.chunked_qk = False
        out[f"{n} after"] = forward()
        for processor in processors:
            processor.chunked_qk = True
        out[f"{n} heads"] = sorted({p.head_groups for p in processors})
        if n == 2:
            compile_expert_blocks(module, parallel=True)
            out["compiled"], out["code"] = run_and_get_code(forward)
    return out


def test_tiny_expert_gives_the_same_output_with_head_groups_and_compiles_them_in_order(tiny4_checkpoint):
    from wan_triton.workers.world import run_world

    for rank in run_world(2, _tiny_expert_runs, (tiny4_checkpoint,)):
        assert rank["1 heads"] == [1] and rank["2 heads"] == [2]
        assert rank[1].abs().max() > 0
        for key in ("2", "2 after", "1 after", "compiled"):
            torch.testing.assert_close(rank[int(key) if key.isdigit() else key], rank[1], rtol=1e-5, atol=1e-5)
        # In each compiled block (the source of a block is the code that calls the exchanges), group 1's Q, K, V
        # are sent before group 0's attention runs, and group 0's output before group 1's attention: inductor
        # kept the order (it did not with its peak-memory reordering on).
        blocks = [code for code in rank["code"] if "all_to_all_single" in code]
        assert blocks, "no compiled code calls the all-to-all"
        for code in blocks:
            assert_self_attention_one_group_ahead(code, 2)
