"""The denoiser's attention processor (used with the GPU kernels) against diffusers' own, on CPU."""

from __future__ import annotations

import pytest
import torch

from checks import sdpa
from factories import expert_forward
from wan_triton.kernels import attention
from wan_triton.kernels.attention import AttentionBackend, WanT2VAttnProcessor
from wan_triton.model.checkpoint import Checkpoint


@pytest.fixture()
def expert(other_checkpoint):
    return Checkpoint.open(other_checkpoint).load_transformer("transformer")


@pytest.mark.parametrize("fused", [False, True])
def test_processor_matches_diffusers(expert, fused):
    reference = expert_forward(expert)
    expert.set_attn_processor(WanT2VAttnProcessor(sdpa))
    if fused:
        before = sum(p.numel() for p in expert.parameters())
        attention.fuse_projections(expert)
        assert sum(p.numel() for p in expert.parameters()) == before  # unfused copies dropped, nothing doubled
    torch.testing.assert_close(expert_forward(expert), reference, rtol=1e-5, atol=1e-5)


def test_processor_really_runs_the_given_kernel(expert):
    reference = expert_forward(expert)
    expert.set_attn_processor(WanT2VAttnProcessor(lambda q, k, v: torch.zeros_like(q)))
    assert not torch.allclose(expert_forward(expert), reference)


def test_auto_keeps_the_reference_processor_on_cpu(expert):
    assert attention.install(expert, "auto", torch.device("cpu")) == AttentionBackend.REFERENCE
    assert not getattr(expert.blocks[0].attn1, "fused_projections", False)


@pytest.mark.parametrize(
    ("installed", "head_dim", "chosen"),
    [
        ({"flash3", "flash4"}, 128, AttentionBackend.FLASH4),
        ({"flash4"}, 128, AttentionBackend.FLASH4),
        ({"flash3"}, 128, AttentionBackend.FLASH3),
        (set(), 128, AttentionBackend.CUDNN),
        ({"flash3", "flash4"}, 80, AttentionBackend.CUDNN),  # a head size neither kernel is built for
    ],
)
def test_auto_takes_the_first_installed_kernel_of_its_order_on_cuda(monkeypatch, installed, head_dim, chosen):
    monkeypatch.setattr(attention, "flash3_available", lambda: "flash3" in installed)
    monkeypatch.setattr(attention, "flash4_available", lambda: "flash4" in installed)
    assert attention.resolve("auto", torch.device("cuda"), head_dim) == chosen


def test_auto_takes_the_reference_for_an_fp32_expert_on_cuda(monkeypatch):
    # The fused kernels take half precision only: an fp32 deployment on a GPU still loads and runs.
    monkeypatch.setattr(attention, "flash3_available", lambda: True)
    monkeypatch.setattr(attention, "flash4_available", lambda: True)
    assert attention.resolve("auto", torch.device("cuda"), 128, torch.float32) == AttentionBackend.REFERENCE
    assert attention.resolve("reference", torch.device("cuda"), 128, torch.float32) == AttentionBackend.REFERENCE


@pytest.mark.parametrize("backend", ["cudnn", "flash3", "flash4"])
def test_a_named_kernel_refuses_fp32_at_load(backend):
    with pytest.raises(ValueError, match=f"{backend} attention runs in bfloat16 or float16, not torch.float32"):
        attention.resolve(backend, torch.device("cuda"), 128, torch.float32)


@pytest.mark.parametrize("backend", ["flash3", "flash4"])
def test_a_named_kernel_refuses_a_head_size_it_is_not_built_for(backend):
    with pytest.raises(ValueError, match=f"{backend} attention supports head sizes .* not 80"):
        attention.resolve(backend, torch.device("cuda"), 80)


@pytest.mark.parametrize(("backend", "package"), [("flash3", "fa3-fwd"), ("flash4", "flash-attn-4")])
def test_a_named_kernel_that_is_not_installed_fails_with_what_to_install(backend, package):
    if attention._import_error(AttentionBackend(backend)) is None:
        pytest.skip(f"{backend} is installed here")
    with pytest.raises(ValueError, match=f"attention {backend} is not installed here .*pip install {package}"):
        attention.resolve(backend, torch.device("cuda"), 128)


def test_flash3_is_not_available_without_a_hopper_gpu():
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("a Hopper GPU is present")
    assert not attention.flash3_available()


@pytest.mark.parametrize(
    ("shape", "capability", "wide"),
    [
        ((2, 75_600, 40, 75_600, 128), (9, 0), True),  # 720p on one GPU, guidance as batch
        ((1, 75_600, 10, 75_600, 128), (9, 0), True),  # 720p rank of cfg2 x ulysses4
        ((2, 32_760, 40, 32_760, 128), (9, 0), True),  # 480p on one GPU
        ((2, 32_760, 10, 32_760, 128), (9, 0), False),  # 480p ulysses4 rank: the default tile measured as fast
        ((2, 75_600, 40, 512, 128), (9, 0), False),  # cross-attention: 512 text keys, not measured
        ((2, 75_600, 40, 75_600, 64), (9, 0), False),  # another head size
        ((2, 75_600, 40, 75_600, 128), (10, 0), False),  # Blackwell runs another kernel
    ],
)
def test_wide_query_tile_only_where_it_was_measured_faster(shape, capability, wide):
    assert attention.use_wide_q_tile(*shape, capability) is wide


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_is_bit_identical_to_diffusers_formula(dtype):
    """attention._rotate computes diffusers' WanAttnProcessor rotation (copied below) with the same products."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 4, 128, generator=gen).to(dtype)
    angles = torch.randn(1, 50, 1, 64, generator=gen)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    expected = torch.empty_like(x)
    expected[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    expected[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    assert torch.equal(attention._rotate(x, cos, sin), expected.type_as(x))
