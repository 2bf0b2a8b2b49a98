"""The parallel settings as pure logic: a plan's rank layout and groups, what a checkpoint and a deployment allow
(plans, Ulysses head groups, the VAE split), and the hand-written RMSNorm's epsilon. The plans themselves run in
tests/multiprocess/."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from wan_triton.config.deployment import ComponentConfig, Components
from wan_triton.config.plan import ParallelPlan, PlanError, RankCoords, num_tokens


def test_rank_layout_and_groups():
    plan = ParallelPlan(cfg=2, ulysses=2, tp=2)
    assert plan.world_size == 8
    assert plan.coords(0) == RankCoords(0, 0, 0)
    assert plan.coords(5) == RankCoords(1, 0, 1)
    assert [plan.rank_of(plan.coords(r)) for r in range(8)] == list(range(8))
    groups = plan.group_ranks()
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["ulysses"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["cfg"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_plan_is_validated_against_the_checkpoint():
    config = {"num_attention_heads": 40, "ffn_dim": 13824}  # Wan2.2 A14B
    ParallelPlan(cfg=2, ulysses=4, tp=1).check_transformer(config)
    ParallelPlan(ulysses=2, tp=4).check_transformer(config)
    with pytest.raises(PlanError, match="num_attention_heads 40 is not divisible by ulysses x tp = 16"):
        ParallelPlan(ulysses=4, tp=4).check_transformer(config)
    with pytest.raises(PlanError, match="ffn_dim 13824 is not divisible by tp = 5"):
        ParallelPlan(tp=5).check_transformer({"num_attention_heads": 40, "ffn_dim": 13824})
    with pytest.raises(PlanError, match="world size cfg x ulysses x tp = 4, got 2"):
        ParallelPlan(cfg=2, tp=2).check_world_size(2)
    with pytest.raises(ValueError, match="cfg"):
        ParallelPlan(cfg=3)
    assert num_tokens(21, 90, 160, (1, 2, 2)) == 21 * 45 * 80


def test_deployment_plan_setting():
    assert ComponentConfig(engine="torch").parallel == ParallelPlan()
    assert ComponentConfig(engine="torch", parallel={"cfg": 2, "tp": 2}).parallel.world_size == 4
    with pytest.raises(ValueError, match="needs engine torch"):
        ComponentConfig(engine="onnxruntime", parallel={"tp": 2})
    with pytest.raises(ValueError, match="extra"):
        ComponentConfig(engine="torch", parallel={"pp": 2})
    # CUDA graphs capture the ranks' collectives (tests/gpu/test_gpu_parallel.py); swapping experts stays single-GPU.
    assert ComponentConfig(engine="torch", device="cuda", parallel={"ulysses": 2}, cuda_graphs=True).cuda_graphs
    with pytest.raises(ValueError, match="does not combine with expert_residency: swap"):
        ComponentConfig(engine="torch", device="cuda", parallel={"tp": 2}, expert_residency="swap")


def test_rms_norm_eps_is_the_one_torch_adds():
    """The tensor-parallel and Ulysses norms write RMSNorm out by hand; with eps=None and bf16 weights torch adds the
    float32 epsilon (its statistics are float32), not bf16's, which would change small activations."""
    from wan_triton.parallel.tensor_parallel import rms_norm_eps

    norm = torch.nn.RMSNorm(64, eps=None).to(torch.bfloat16)
    x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 1e-3).to(torch.bfloat16)
    xf = x.float()
    by_hand = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + rms_norm_eps(norm)) * norm.weight).type_as(x)
    assert torch.equal(by_hand, norm(x))
    assert rms_norm_eps(torch.nn.RMSNorm(64, eps=1e-6)) == 1e-6


def test_head_groups_that_do_not_split_a_ranks_heads_are_refused():
    config = {"num_attention_heads": 40, "ffn_dim": 13824}
    ParallelPlan(cfg=2, ulysses=4).check_transformer(config, ulysses_head_groups=5)  # 10 heads a rank, 5 groups
    with pytest.raises(PlanError, match="ulysses_head_groups 4 does not divide the 10 heads of a rank"):
        ParallelPlan(cfg=2, ulysses=4).check_transformer(config, ulysses_head_groups=4)
    with pytest.raises(ValueError, match="ulysses_head_groups 2 needs a plan with ulysses > 1"):
        ComponentConfig(engine="torch", parallel={"cfg": 2}, ulysses_head_groups=2)
    ComponentConfig(engine="torch", parallel={"ulysses": 2}, ulysses_head_groups=2)


def test_split_width_is_a_vae_setting():
    torch_cpu = ComponentConfig(engine="torch")
    with pytest.raises(ValidationError, match="denoiser: split_width is a vae_decoder setting"):
        Components(
            text_encoder=torch_cpu, denoiser=ComponentConfig(engine="torch", split_width=2), vae_decoder=torch_cpu
        )
    with pytest.raises(ValidationError, match="vae_decoder: parallel is a denoiser setting"):
        Components(
            text_encoder=torch_cpu, denoiser=torch_cpu, vae_decoder=ComponentConfig(engine="torch", parallel={"tp": 2})
        )
    with pytest.raises(ValidationError, match="split_width 2 needs engine torch and one instance"):
        ComponentConfig(engine="onnxruntime", split_width=2)
    with pytest.raises(ValidationError, match="split_width 2 does not combine with precision float16"):
        ComponentConfig(engine="torch", split_width=2, precision="float16")
