"""The analytic step-time model of parallel plans (wan_bench.perf_model): pure arithmetic, checked by hand."""

from __future__ import annotations

import pytest

from wan_bench.perf_model import (
    Bandwidth,
    ModelShape,
    collective_seconds,
    collectives,
    flop_per_rank,
    flop_scaled_compute,
    plans_of,
    predict,
    predict_from_compute,
)
from wan_triton.config.plan import ParallelPlan, PlanError

# A14B at 720p, 81 frames: 21 latent frames x 45 x 80 tokens.
A14B_720P = ModelShape(num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824, tokens=21 * 45 * 80)
BW = Bandwidth(all_reduce=400e9, all_to_all=300e9, all_gather=350e9, latency_s=20e-6)


def test_one_gpu_is_the_calibration_point():
    p = predict(A14B_720P, ParallelPlan(), 20.0, BW)
    assert p.compute_s == 20.0 and p.comm_s == 0.0 and p.collectives == []


def test_cfg_parallel_halves_compute_and_exchanges_one_noise_prediction():
    p = predict(A14B_720P, ParallelPlan(cfg=2), 20.0, BW)
    assert p.compute_s == pytest.approx(10.0)
    (gather,) = p.collectives
    assert (gather.kind, gather.group_size, gather.calls) == ("all_gather", 2, 1)
    assert gather.bytes_per_rank == 75600 * 16 * 4 * 2  # tokens x (16 channels x 2x2 patch) x bf16
    # NCCL-tests count an all-gather by its output (2 x the input here) with the factor 1/2: input x 1 on the bus.
    assert p.comm_s == pytest.approx(20e-6 + gather.bytes_per_rank * 1.0 / 350e9)


def test_tensor_parallel_all_reduces_three_activations_per_layer():
    p = predict(A14B_720P, ParallelPlan(tp=2), 20.0, BW)
    big = p.collectives[0]
    assert (big.kind, big.calls) == ("all_reduce", 3 * 40)
    assert big.bytes_per_rank == 2 * 75600 * 5120 * 2  # batch 2 x tokens x width x bf16 = 1.55 GB
    # 120 calls x 1.55 GB x 2 (n-1)/n / 400 GB/s = 0.46 s, plus the small RMSNorm all-reduces and latencies.
    assert p.comm_s == pytest.approx(120 * 1.548288e9 / 400e9, rel=0.02)
    # Everything splits by 2 except the cross-attention K/V on the text, which tp still splits: exactly half.
    assert p.compute_s == pytest.approx(10.0)


def test_ulysses_moves_qkv_and_output_once_per_layer_and_repeats_the_text_projection():
    p = predict(A14B_720P, ParallelPlan(ulysses=2), 20.0, BW)
    a2a = p.collectives[0]
    assert (a2a.kind, a2a.calls, a2a.group_size) == ("all_to_all", 4 * 40, 2)
    assert a2a.bytes_per_rank == 2 * 37800 * 40 * 128 * 2
    # The text K/V projection (4 x 512 x d^2 per layer) is repeated on both ranks: slightly above half.
    assert 10.0 < p.compute_s < 10.05


def test_flop_split_and_more_bandwidth_means_less_time():
    one = flop_per_rank(A14B_720P, ParallelPlan())
    assert flop_per_rank(A14B_720P, ParallelPlan(cfg=2, ulysses=2, tp=2)) == pytest.approx(one / 8, rel=0.01)
    slow = predict(A14B_720P, ParallelPlan(ulysses=2, tp=2), 20.0, BW)
    fast = predict(A14B_720P, ParallelPlan(ulysses=2, tp=2), 20.0, Bandwidth(800e9, 600e9, 700e9, 20e-6))
    assert fast.step_s < slow.step_s and fast.compute_s == slow.compute_s


def test_plans_of_lists_what_fits_and_predict_refuses_what_does_not():
    assert [str(p) for p in plans_of(4, 40, 13824)] == [
        "cfg1xulysses1xtp4",
        "cfg1xulysses2xtp2",
        "cfg1xulysses4xtp1",
        "cfg2xulysses1xtp2",
        "cfg2xulysses2xtp1",
    ]
    assert ParallelPlan(ulysses=16) not in plans_of(16, 40, 13824)
    with pytest.raises(PlanError):
        predict(A14B_720P, ParallelPlan(ulysses=16), 20.0, BW)
    assert len(collectives(A14B_720P, ParallelPlan(cfg=2, ulysses=2, tp=2))) == 6


def test_measured_compute_replaces_the_flop_scaling_and_keeps_the_collectives():
    plan = ParallelPlan(cfg=2, ulysses=2)
    scaled = predict(A14B_720P, plan, 20.0, BW)
    assert flop_scaled_compute(A14B_720P, plan, 20.0) == pytest.approx(scaled.compute_s)
    measured = predict_from_compute(A14B_720P, plan, 6.0, BW)
    assert measured.compute_s == 6.0
    assert measured.comm_s == pytest.approx(scaled.comm_s) and measured.collectives == scaled.collectives
    with pytest.raises(PlanError):
        predict_from_compute(A14B_720P, ParallelPlan(ulysses=16), 1.0, BW)


def test_head_groups_hide_all_but_one_group_of_the_attention_all_to_alls():
    """With G head groups only 1/G of the all-to-alls around attention is waited for (assumption 3); the output
    head's all-gather and the cfg exchange stay in line, and the compute is what the caller measured."""
    plan = ParallelPlan(cfg=2, ulysses=4)
    whole = predict_from_compute(A14B_720P, plan, 2.4, BW)
    for groups in (2, 5, 10):
        grouped = predict_from_compute(A14B_720P, plan, 2.4, BW, ulysses_head_groups=groups)
        a2a, a2a_grouped = whole.collectives[0], grouped.collectives[0]
        assert a2a.kind == "all_to_all" and (a2a.exposed, a2a_grouped.exposed) == (1.0, 1 / groups)
        # G calls of 1/G of the bytes for each exchange; the first group's Q, K, V and the last group's output,
        # 4 calls a layer, are waited for.
        assert (a2a_grouped.calls, a2a_grouped.bytes_per_rank) == (a2a.calls * groups, a2a.bytes_per_rank / groups)
        waited = a2a.calls * (BW.latency_s + a2a.bytes_per_rank / groups * 3 / 4 / BW.all_to_all)
        assert grouped.comm_s == pytest.approx(whole.comm_s - collective_seconds(a2a, BW) + waited)
        assert grouped.compute_s == 2.4
    with pytest.raises(PlanError, match="ulysses_head_groups 4 does not divide the 10 heads of a rank"):
        predict_from_compute(A14B_720P, plan, 2.4, BW, ulysses_head_groups=4)
