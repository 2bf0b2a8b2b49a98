"""benchmarks/parallel_compute.py on CPU: rank 0 of every plan alone, in torch.distributed's fake process group,
on a tiny model. What it must get right whatever the timings: every plan is run, a tp rank holds its share of the
weights, and the model's rows are built from the measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "parallel_compute.py"


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compute") / "compute.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--repeat", "1", "--world-sizes", "2", "4"]
    cmd += ["--ulysses-head-groups", "2"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_every_plan_that_fits_is_measured(result):
    # The tiny expert has 4 heads: every plan of world size 2 and 4 fits.
    assert set(result["measured"]) == {
        "cfg1xulysses1xtp1",
        "cfg1xulysses1xtp2",
        "cfg1xulysses2xtp1",
        "cfg2xulysses1xtp1",
        "cfg1xulysses1xtp4",
        "cfg1xulysses2xtp2",
        "cfg1xulysses4xtp1",
        "cfg2xulysses1xtp2",
        "cfg2xulysses2xtp1",
        # Two head groups where a rank has 2 heads (ulysses 2 without tp).
        "cfg1xulysses2xtp1+groups2",
        "cfg2xulysses2xtp1+groups2",
    }
    for entry in result["measured"].values():
        assert entry["sizes"]["tiny"]["compute_s"] > 0


def test_a_tp_rank_holds_its_share_of_the_block_weights(result):
    weights = {plan: e["weight_bytes_per_expert"] for plan, e in result["measured"].items()}
    one, tp2, tp4 = (weights[f"cfg1xulysses1xtp{n}"] for n in (1, 2, 4))
    # Whole = R + P, where the attention and FFN weights P are split and the rest R (embeddings, modulation, output
    # head, biases of row-parallel layers) stays whole: a tp rank holds R + P / tp.
    split = 2 * (one - tp2)
    assert tp2 - tp4 == split / 4
    assert split > 0.5 * one  # even in this tiny model, where the embeddings weigh relatively more than in A14B
    # cfg and ulysses ranks hold the whole expert.
    assert weights["cfg2xulysses1xtp1"] == weights["cfg1xulysses2xtp1"] == one


def test_model_rows_add_communication_to_the_measured_compute(result):
    rows = result["model"]["tiny"]["plans"]
    one = rows["cfg1xulysses1xtp1"]
    assert one["predicted_comm_s"] == 0 and one["predicted_step_s"] == one["measured_compute_s"]
    for plan, row in rows.items():
        assert row["measured_compute_s"] == result["measured"][plan]["sizes"]["tiny"]["compute_s"]
        # No profile on CPU, so no stand-in copies were counted to take out of the compute.
        assert row["exchange_stand_in_s"] == 0 and row["compute_s"] == row["measured_compute_s"]
        assert row["predicted_step_s"] == pytest.approx(row["compute_s"] + row["predicted_comm_s"])
        if plan != "cfg1xulysses1xtp1":
            assert row["predicted_comm_s"] > 0
    # Two head groups: half of the all-to-alls' time is hidden, the rest of the communication is the same.
    for plan in ("cfg1xulysses2xtp1", "cfg2xulysses2xtp1"):
        grouped = rows[f"{plan}+groups2"]
        assert 0 < grouped["predicted_comm_s"] < rows[plan]["predicted_comm_s"]


def test_the_all_to_all_stand_ins_copies_leave_the_compute_the_model_uses():
    """On a GPU the profile counts the stand-ins' device-to-device copies; the model's step replaces them by NCCL
    time, so a Ulysses plan's compute leaves them out, and a plan without all-to-alls keeps its measured time."""
    from wan_bench.experts import TINY_TRANSFORMER
    from wan_bench.perf_model import Bandwidth
    from wan_bench.plans import predictions

    def size(compute_s: float, copies_ms: float) -> dict:
        sizes = {"tiny": {"compute_s": compute_s, "profile": {"memcpy_dtod_ms": copies_ms}}}
        return {"weight_bytes_per_expert": 1, "sizes": sizes}

    measured = {
        "cfg1xulysses1xtp1": size(1.0, 0.1),
        "cfg1xulysses2xtp1": size(0.6, 40.0),
        "cfg2xulysses1xtp1": size(0.5, 0.1),
    }
    bw = Bandwidth(all_reduce=1e11, all_to_all=1e11, all_gather=1e11, latency_s=0.0)
    rows = predictions(measured, TINY_TRANSFORMER, bw, tiny=True)["tiny"]["plans"]
    assert rows["cfg1xulysses2xtp1"]["compute_s"] == pytest.approx(0.56)
    assert rows["cfg1xulysses1xtp1"]["compute_s"] == 1.0 and rows["cfg2xulysses1xtp1"]["compute_s"] == 0.5
    ulysses = rows["cfg1xulysses2xtp1"]
    assert ulysses["predicted_step_s"] == pytest.approx(0.56 + ulysses["predicted_comm_s"])


def test_device_copies_are_told_by_both_names_the_profiler_gives_them():
    from wan_bench.profiling import is_device_copy

    assert is_device_copy("Memcpy DtoD (Device -> Device)") and is_device_copy("memcpy128")
    assert not is_device_copy("Memcpy HtoD (Pageable -> Device)")
    assert not is_device_copy("triton_poi_fused_clone_exchange_stand_in_permute_select_split_view_2")
