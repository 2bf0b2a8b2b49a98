"""FP8 (e4m3) linear layers and self-attention for the Wan denoiser on Hopper: the opt-in `precision: fp8`.

Hopper's FP8 tensor cores run at about twice the bf16 rate, and a 720p step is mostly self-attention, so both the
block's linear layers and its self-attention run in e4m3 here; everything else (patch and condition embeddings, norms,
modulation, the final projection, and cross-attention's softmax(QK^T)V over the 512 text tokens) stays bf16: about 1%
of a 480p step's FLOP and 0.5% of a 720p one's, so FP8 would gain them nothing measurable (figures:
benchmarks/RESULTS.md, Precision).

Linear layers (`Fp8Linear`): the weight is stored in e4m3 with one fp32 scale per output channel, computed once from
the bf16 weight (`quantize_weight`); the activation is scaled per token at run time (`quantize_rows`) and the product
runs as `torch._scaled_mm` with row-wise scales, accumulating in fp32, adding the bias in its epilogue and writing
bf16. In a block (`Fp8TransformerBlock`) the inputs that a norm, a residual add or the FFN's GELU produce come already
quantized, in one pass over memory (`fp8_rows`: faster than the compiled torch ops, benchmarks/RESULTS.md,
Precision); the layer quantizes any other input (the attention outputs) itself, with compiled torch ops, or with
`fp8_rows.quantize` after `use_quantize_kernels`. Off CUDA the same quantized operands are dequantized and multiplied
in fp32: the reference math the CPU tests check.

Self-attention (`fp8_attention`): FlashAttention-3's e4m3 forward (the `fa3-fwd` build) with one scale per (batch,
head) for each of Q, K and V, the finest its descale tensors take, K smoothed first (`fp8_heads`: compiled torch ops,
or its Triton kernels after `use_quantize_kernels`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn

from wan_triton.kernels import attention, fp8_heads, fp8_rows
from wan_triton.kernels.fp8_rows import E4M3, E4M3_MAX, MIN_AMAX, QuantizedRows, quantize_rows

logger = logging.getLogger(__name__)

# The linear layers of a transformer block that run in FP8, by their names inside the block (after
# `attention.fuse_projections`): all of them. Weights are quantized at load, or read from the build-time FP8 weights
# (wan_triton.runtime.fp8_weights). Cross-attention's K/V projection (`attn2.to_kv`) multiplies only the 512
# text tokens, so FP8 gains it no time, but it holds 15% of an expert's weights (5120 x 10240 a block): left in bf16 an
# A14B expert measured 16.8 GB against bf16's 28.8 GB instead of about half (benchmarks/RESULTS.md, Precision).
FP8_BLOCK_LINEARS = (
    "attn1.to_qkv",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_kv",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)
SCALE_METHOD = "e4m3fn weight per output channel (amax/448), activation per token, attention per (batch, head)"

# Whether the attention operands (`fp8_heads.quantize_attention`) and the attention outputs (`fp8_rows.quantize`) are
# quantized by their Triton kernels rather than by compiled torch ops. The output kernel alone beats the compiled ops
# (benchmarks/RESULTS.md, Precision), but inside a compiled block a kernel is opaque to the compiler, which may have
# fused the ops with their neighbours: off until the whole step with them is measured (benchmarks/denoiser_step.py,
# variant fp8-kernels).
_quantize_kernels = False


def use_quantize_kernels(on: bool = True) -> None:
    """Quantize the attention operands and outputs with Triton kernels (`on`) or compiled torch ops, in this process,
    from the next compile or eager call on."""
    global _quantize_kernels
    _quantize_kernels = on


def supported(device: torch.device) -> str | None:
    """None where FP8 runs on `device`, else why not (the config error a load reports)."""
    if device.type != "cuda":
        return f"precision fp8 needs a CUDA device (Hopper, SM90), not {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability[0] != 9:
        name = torch.cuda.get_device_name(device)
        return f"precision fp8 needs a Hopper GPU (SM90); {name} is SM{capability[0]}{capability[1]}"
    try:
        importlib.import_module("fa3_fwd._C")
    except ImportError as exc:
        return (
            "precision fp8 runs self-attention in FlashAttention-3's e4m3 forward, which is not installed "
            f"({exc}): pip install fa3-fwd==0.0.3"
        )
    return None


# --- quantization ---


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (e4m3 [N, K], fp32 scale [N]) with weight ~= e4m3 * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=MIN_AMAX) / E4M3_MAX
    return (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


# --- linear ---


def scaled_matmul(
    x8: torch.Tensor,
    x_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x8 * x_scale) @ (w8 * w_scale[:, None]).T + bias for x8 [M, K], w8 [N, K], bias [N] (out_dtype): FP8 tensor
    cores on CUDA with the bias added to the fp32 accumulator in the GEMM's epilogue (no pass over the output of its
    own, which a custom op after the layer could not fuse), the same dequantized operands in fp32 elsewhere."""
    if x8.device.type == "cuda":
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale[None, :], bias=bias, out_dtype=out_dtype)
    out = (x8.float() * x_scale) @ (w8.float() * w_scale[:, None]).t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


class Fp8Linear(nn.Module):
    """nn.Linear with an e4m3 weight scaled per output channel; the parameter names stay `weight` and `bias` (plus
    `weight_scale`), so expert swapping, which copies parameters by name, carries the FP8 weights as they are."""

    def __init__(self, weight8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight8.shape[1], weight8.shape[0]
        self.weight = nn.Parameter(weight8, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def out_dtype(self) -> torch.dtype:
        """The output dtype of an input that comes quantized (`QuantizedRows`): the block's, which its bias has."""
        return torch.bfloat16 if self.bias is None else self.bias.dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, work_device: torch.device | None = None) -> Fp8Linear:
        """Quantized from `linear`'s weight, computed on `work_device` (default: where the weight is) and kept
        where the weight was."""
        home = linear.weight.device
        weight8, scale = quantize_weight(linear.weight.detach().to(work_device or home))
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight8.to(home), scale.to(home), bias)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        """x: the activation [..., K], quantized here per token, or already quantized (`fp8_rows`)."""
        return self.product(x, self.bias)

    def product(self, x: torch.Tensor | QuantizedRows, bias: torch.Tensor | None) -> torch.Tensor:
        """`forward` with `bias` (or none) added in the GEMM's epilogue."""
        if isinstance(x, QuantizedRows):
            lead, out_dtype = x.values.shape[:-1], self.out_dtype
            x8, x_scale = x.values.reshape(-1, self.in_features), x.scale.reshape(-1, 1)
        elif _quantize_kernels:
            lead, out_dtype = x.shape[:-1], x.dtype
            rows = fp8_rows.quantize(x)
            x8, x_scale = rows.values.reshape(-1, self.in_features), rows.scale.reshape(-1, 1)
        else:
            lead, out_dtype = x.shape[:-1], x.dtype
            x8, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        out = scaled_matmul(x8, x_scale, self.weight, self.weight_scale, out_dtype, bias)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per output channel"


# (block index, layer name in FP8_BLOCK_LINEARS) -> (e4m3 weight [N, K], fp32 scale [N]) computed at build time.
StoredWeights = Callable[[int, str], tuple[torch.Tensor, torch.Tensor]]


def quantize_module(
    module: nn.Module, work_device: torch.device | None = None, stored: StoredWeights | None = None
) -> int:
    """In place: every linear layer in `FP8_BLOCK_LINEARS` of every transformer block of a WanTransformer3DModel
    (attention installed, projections fused) becomes an `Fp8Linear`, its weight quantized here or, with `stored`,
    taken from the build-time FP8 weights (the same values: `quantize_weight` of the same bf16 weight). Returns how
    many were replaced.

    The FFN's fused projection + GELU op (`kernels.ffn`) takes a bf16 weight, so a block's FFN returns to diffusers'
    FeedForward: its GELU, compiled, then fuses with the next layer's activation quantization instead."""
    from diffusers.models.attention import FeedForward

    from wan_triton.kernels.ffn import GeluEpilogueFeedForward

    replaced = 0
    for index, block in enumerate(module.blocks):
        for sub in block.modules():
            if type(sub) is GeluEpilogueFeedForward:
                sub.__class__ = FeedForward
        for name in FP8_BLOCK_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, child) if not child.isdigit() else parent[int(child)]
            if isinstance(linear, Fp8Linear):
                continue
            # A parallel plan's own layers (wan_triton.parallel's row-parallel linear) make their FP8 form themselves.
            sharded = hasattr(linear, "to_fp8")
            if type(linear) is not nn.Linear and not sharded:
                raise TypeError(f"block layer {name} is {type(linear).__name__}, not nn.Linear: cannot quantize it")
            out_features, in_features = linear.weight.shape
            if in_features % 16 or out_features % 16:
                # FP8 tensor-core GEMMs need both sizes in multiples of 16.
                raise ValueError(
                    f"precision fp8: block layer {name} is {in_features} -> {out_features}; "
                    "FP8 GEMMs need multiples of 16"
                )
            if sharded:
                if stored is not None:
                    raise ValueError(f"stored FP8 weights are of whole layers; block layer {name} is a shard")
                fp8 = linear.to_fp8(work_device)
            elif stored is None:
                fp8 = Fp8Linear.from_linear(linear, work_device)
            else:
                weight8, scale = stored(index, name)
                if weight8.shape != linear.weight.shape or weight8.dtype != E4M3 or scale.shape != weight8.shape[:1]:
                    raise ValueError(f"stored FP8 weight of block {index} {name} does not fit the layer")
                home = linear.weight.device
                bias = None if linear.bias is None else linear.bias.detach()
                fp8 = Fp8Linear(weight8.to(home), scale.to(home, torch.float32), bias)
            if child.isdigit():
                parent[int(child)] = fp8
            else:
                setattr(parent, child, fp8)
            replaced += 1
    logger.info("FP8 linear layers: %d", replaced)
    return replaced


# --- block ---


class Fp8TransformerBlock(WanTransformerBlock):
    """diffusers' WanTransformerBlock whose FP8 linear layers take their input quantized by the one-pass ops of
    `fp8_rows` (the norm, modulation, residual add and GELU before each projection) instead of quantizing a bf16
    activation that compiled torch ops produced; same submodules, same parameters, the same math up to where the
    bf16 rounding of the norm's output falls (`fp8_rows`). Timestep embeddings per token (TI2V-5B) keep diffusers'
    forward."""

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        if temb.ndim == 4:
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)
        rows = fp8_rows.norm_quantize(hidden_states, self.norm1.eps, mod_scale=scale_msa, mod_shift=shift_msa)
        attn_output = self.attn1(rows, None, None, rotary_emb)
        hidden_states, rows = fp8_rows.residual_norm_quantize(
            hidden_states, attn_output, self.norm2.eps, gate=gate_msa, weight=self.norm2.weight, bias=self.norm2.bias
        )
        attn_output = self.attn2(rows, encoder_hidden_states, None, None)
        hidden_states, rows = fp8_rows.residual_norm_quantize(
            hidden_states, attn_output, self.norm3.eps, mod_scale=c_scale_msa, mod_shift=c_shift_msa
        )
        # net[1] and any net[3:] are dropouts with p = 0 (`ffn.has_wan_layout` checks), so the output layer follows.
        ff_output = self.ffn.net[2](fp8_rows.gelu_quantize(self.ffn.net[0].proj(rows)))
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


def _fusable_block(block: nn.Module) -> bool:
    """The layout `Fp8TransformerBlock` computes: non-affine norms around an affine cross-attention norm (diffusers'
    Wan with `cross_attn_norm`), diffusers' Wan FFN (`ffn.has_wan_layout`), and every one of them in FP8."""
    from diffusers.models.normalization import FP32LayerNorm

    from wan_triton.kernels.ffn import has_wan_layout

    if type(block) is not WanTransformerBlock:
        return False
    norms = (block.norm1, block.norm2, block.norm3)
    if not all(type(n) is FP32LayerNorm for n in norms) or block.norm1.weight is not None:
        return False
    if block.norm3.weight is not None or block.norm2.weight is None or block.norm2.bias is None:
        return False
    return (
        has_wan_layout(block.ffn)
        and isinstance(block.ffn.net[0].proj, Fp8Linear)
        and isinstance(block.ffn.net[2], Fp8Linear)
        # This project's processors (one GPU, or a parallel plan's) hand the quantized rows to the projections as
        # they come.
        and isinstance(block.attn1.processor, attention.WanT2VAttnProcessor)
        and all(isinstance(a.to_out[0], Fp8Linear) for a in (block.attn1, block.attn2))
        and isinstance(getattr(block.attn1, "to_qkv", None), Fp8Linear)
        and isinstance(block.attn2.to_q, Fp8Linear)
    )


def install_blocks(module: nn.Module) -> int:
    """In place: every block of a WanTransformer3DModel whose FP8 layers and layout `Fp8TransformerBlock` computes
    becomes one; `compile_repeated_blocks` compiles them as it does diffusers' blocks. Returns how many."""
    changed = 0
    for block in module.blocks:
        if _fusable_block(block):
            block.__class__ = Fp8TransformerBlock
            changed += 1
    if changed:
        module._repeated_blocks = [*type(module)._repeated_blocks, Fp8TransformerBlock.__name__]
    logger.info("FP8 blocks with one-pass activation quantization: %d", changed)
    return changed


# --- attention ---

_fa3_fp8_op = None


def _fa3_fp8():
    """FlashAttention-3's e4m3 forward as a torch custom op (one opaque kernel to torch.compile and CUDA graphs)."""
    global _fa3_fp8_op
    if _fa3_fp8_op is None:
        import fa3_fwd._C  # noqa: F401 - registers torch.ops.fa3_fwd

        @torch.library.custom_op("wan_triton::flash3_fp8_attention", mutates_args=())
        def flash3_fp8_attention(
            q8: torch.Tensor,
            k8: torch.Tensor,
            v8: torch.Tensor,
            q_descale: torch.Tensor,
            k_descale: torch.Tensor,
            v_descale: torch.Tensor,
        ) -> torch.Tensor:
            # One split, as the bf16 flash3 backend: each row's softmax in one order over the keys.
            return torch.ops.fa3_fwd.fwd(
                q8,
                k8,
                v8,
                q_descale=q_descale,
                k_descale=k_descale,
                v_descale=v_descale,
                is_causal=False,
                num_splits=1,
            )[0]

        @flash3_fp8_attention.register_fake
        def _(q8, k8, v8, q_descale, k_descale, v_descale):
            return torch.empty(q8.shape, dtype=torch.bfloat16, device=q8.device)

        _fa3_fp8_op = flash3_fp8_attention
    return _fa3_fp8_op


def reference_attention(q, k, v, q_scale, k_scale, v_scale) -> torch.Tensor:
    """The FP8 attention's math in fp32 from the quantized operands ([B, S, H, D] e4m3, [B, H] scales): what the
    kernel computes up to its own rounding of the probabilities to e4m3 and its accumulation order."""
    deq = [t.float() * s[:, None, :, None] for t, s in ((q, q_scale), (k, k_scale), (v, v_scale))]
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in deq))
    return out.transpose(1, 2)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_k: bool = True) -> torch.Tensor:
    """q, k, v [B, S, H, D] bf16 -> attention [B, S, H, D] bf16, with e4m3 operands scaled per (batch, head)
    (`fp8_heads`)."""
    quantize = fp8_heads.quantize_attention if _quantize_kernels else fp8_heads.reference_quantize_attention
    operands = quantize(q, k, v, smooth_k)
    if q.device.type != "cuda":
        return reference_attention(*operands).to(q.dtype)
    return _fa3_fp8()(*operands)


class Fp8AttnProcessor(attention.WanT2VAttnProcessor):
    """The served processor with self-attention in FP8; cross-attention (512 text keys) keeps the bf16 kernel."""

    def __init__(self, attend: attention.AttentionFn, smooth_k: bool = True) -> None:
        super().__init__(attend)
        self.smooth_k = smooth_k

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_attention: bool) -> torch.Tensor:
        if not self_attention:
            return self.attend(q, k, v)
        return fp8_attention(q, k, v, smooth_k=self.smooth_k)


def install_attention(
    module: nn.Module, backend: attention.AttentionBackend | str, device: torch.device
) -> attention.AttentionBackend:
    """`attention.install` (the bf16 kernel for cross-attention, fused projections), then self-attention in FP8: the
    first part of `install`, alone for measuring each part's share. Returns the bf16 attention kernel chosen. Raises
    ValueError where FP8 cannot run."""
    require(device, backend)
    chosen = attention.install(module, backend, device)
    module.set_attn_processor(Fp8AttnProcessor(attention.attention_fn(chosen)))
    return chosen


def require(device: torch.device, backend: attention.AttentionBackend | str) -> None:
    """Raises ValueError where precision fp8 cannot run on `device` beside the bf16 attention kernel `backend`; else
    defines the FP8 attention op, eagerly (torch.compile cannot trace its definition)."""
    if (why := supported(device)) is not None:
        raise ValueError(why)
    if attention.AttentionBackend(backend) == attention.AttentionBackend.REFERENCE:
        raise ValueError("precision fp8 needs one of the served attention kernels, not attention: reference")
    _fa3_fp8()


def install(
    module: nn.Module,
    backend: attention.AttentionBackend | str,
    device: torch.device,
    stored: StoredWeights | None = None,
    one_pass: bool = True,
) -> attention.AttentionBackend:
    """`install_attention`, then the block linear layers in FP8 (weights from `stored` when given, else quantized
    here), their inputs quantized in one pass (`install_blocks`; `one_pass=False` keeps each layer quantizing its bf16
    input, for comparison). Returns the bf16 attention kernel chosen. Raises ValueError where FP8 cannot run."""
    chosen = install_attention(module, backend, device)
    quantize_module(module, stored=stored)
    if one_pass:
        install_blocks(module)
    return chosen
