"""The FFN with its GELU in the input projection's epilogue (wan_triton.kernels.ffn) against diffusers' FFN, on CPU.

On CPU the op computes diffusers' two ops, so the outputs must be identical; what these tests pin down is that the
served module really goes through the op, keeps its parameter names, compiles, and is only installed where it
reproduces diffusers' layout. tests/gpu/test_gpu.py checks the CUDA epilogue's numerics.
"""

from __future__ import annotations

import copy

import torch
from diffusers.models.attention import FeedForward

from factories import expert_forward
from wan_triton.kernels import ffn
from wan_triton.model.checkpoint import Checkpoint


def test_expert_with_fused_ffn_matches_diffusers_and_keeps_its_parameter_names(other_checkpoint, monkeypatch):
    expert = Checkpoint.open(other_checkpoint).load_transformer("transformer")
    reference = expert_forward(expert)
    names = [name for name, _ in expert.named_parameters()]
    calls = []
    op = ffn.linear_gelu_tanh
    monkeypatch.setattr(ffn, "linear_gelu_tanh", lambda *args: calls.append(1) or op(*args))

    assert ffn.install(expert) == len(expert.blocks)
    assert all(type(block.ffn) is ffn.GeluEpilogueFeedForward for block in expert.blocks)
    assert [name for name, _ in expert.named_parameters()] == names  # shards and expert swapping address by name
    assert torch.equal(expert_forward(expert), reference)
    assert len(calls) == len(expert.blocks)  # every block's FFN went through the op


def test_fused_ffn_compiles_as_one_graph():
    torch.manual_seed(0)
    module = FeedForward(64, inner_dim=192, activation_fn="gelu-approximate").eval()
    fused = copy.deepcopy(module)
    ffn.install(fused)
    x = torch.randn(2, 37, 64)
    with torch.no_grad():
        compiled = torch.compile(fused, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-6, atol=1e-6)


def test_only_diffusers_tanh_gelu_layout_is_fused():
    exact_gelu = FeedForward(64, inner_dim=192, activation_fn="gelu")
    with_dropout = FeedForward(64, inner_dim=192, activation_fn="gelu-approximate", dropout=0.1)
    geglu = FeedForward(64, inner_dim=192, activation_fn="geglu")
    for module in (exact_gelu, with_dropout, geglu):
        assert ffn.install(module) == 0
        assert type(module) is FeedForward
