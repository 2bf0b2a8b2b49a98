"""Attention kernels for the Wan denoiser on GPU, plugged in through diffusers' attention-processor mechanism.

At 720p most of a step's work is the S^2 attention, so this choice decides the step time. On Hopper,
FlashAttention-4 (CuTe DSL) is the fastest of the kernels here, FlashAttention-3's forward (the fa3-fwd build) close
behind, and SDPA with the cuDNN backend forced the fastest without an extra package; PyTorch's default SDPA pick is
slower than all three (benchmarks/RESULTS.md, Kernels). `auto` takes FlashAttention-4, else FlashAttention-3, else
cuDNN; on CPU it leaves diffusers' own processor in place (the reference's numerics).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from enum import StrEnum

import torch
import torch.nn.functional as F

from wan_triton.kernels import ffn

logger = logging.getLogger(__name__)

# q, k, v: [batch, seq, heads, head_dim] -> [batch, seq, heads, head_dim]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionBackend(StrEnum):
    AUTO = "auto"
    REFERENCE = "reference"  # diffusers' processor and its default dispatch, unchanged
    CUDNN = "cudnn"  # PyTorch SDPA with the cuDNN backend forced
    FLASH4 = "flash4"  # flash-attn-4 (CuTe DSL), Hopper and Blackwell
    FLASH3 = "flash3"  # FlashAttention-3's forward (the fa3-fwd build), Hopper only


# The module each optional kernel is imported from, and how to install it.
_PACKAGES = {
    AttentionBackend.FLASH4: ("flash_attn.cute", "pip install flash-attn-4"),
    AttentionBackend.FLASH3: ("fa3_fwd._C", "pip install fa3-fwd==0.0.3 (Hopper, a CUDA 13 build of torch)"),
}


def _import_error(backend: AttentionBackend) -> ImportError | None:
    """None where the kernel's package imports, else the error that says why not."""
    try:
        importlib.import_module(_PACKAGES[backend][0])
    except ImportError as exc:
        return exc
    return None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # PyTorch's own SDPA pick, as diffusers' default ("native") dispatch calls it.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_flash4_op = None

# FlashAttention-4's forward on Hopper at head size 128, long sequences: query tiles of 192 rows (three consumer
# warpgroups) instead of its default 128 are faster on every 720p shape the parallel plans run (batch 1-2 x
# 5-40 heads x 75,600 tokens) and on the larger 480p ones; below about 700k query rows (batch x heads x tokens) the
# default is as fast or faster (benchmarks/RESULTS.md, Kernels). The key tile stays 128, so each row accumulates its
# softmax in the same order and the output is bit-identical.
WIDE_Q_TILE = {"tile_mn": (192, 128), "mma_pv_is_rs": True, "intra_wg_overlap": False, "num_threads": 512}
WIDE_Q_TILE_MIN_ROWS = 700_000
WIDE_Q_TILE_MIN_KEYS = 16_384  # measured with 32,760 and 75,600 keys only; cross-attention's 512 keep the default


def use_wide_q_tile(
    batch: int, seqlen_q: int, heads: int, seqlen_k: int, head_dim: int, capability: tuple[int, int]
) -> bool:
    return (
        capability[0] == 9
        and head_dim == 128
        and batch * heads * seqlen_q >= WIDE_Q_TILE_MIN_ROWS
        and seqlen_k >= WIDE_Q_TILE_MIN_KEYS
    )


def _flash4() -> AttentionFn:
    """FlashAttention-4 as a torch custom op, so regional torch.compile treats it as one opaque kernel."""
    global _flash4_op
    if _flash4_op is None:
        from flash_attn.cute import flash_attn_func

        # The tile is a keyword of the module's forward entry point only (flash_attn_func does not pass it on);
        # a release without it keeps the default tile.
        try:
            from flash_attn.cute.interface import _flash_attn_fwd
        except ImportError:
            _flash_attn_fwd = None
            logger.warning("flash_attn.cute.interface._flash_attn_fwd is missing: FlashAttention-4 keeps its tiles")

        @torch.library.custom_op("wan_triton::flash4_attention", mutates_args=())
        def flash4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            batch, seqlen_q, heads, head_dim = q.shape
            capability = torch.cuda.get_device_capability(q.device)
            if _flash_attn_fwd is None:
                out = flash_attn_func(q, k, v, causal=False)
                return out[0] if isinstance(out, tuple) else out
            # The forward entry point for the default tile too, not flash_attn_func and its autograd wrapper (for a
            # backward never run here), whose Python overhead is a visible share of a call at 720p shapes
            # (benchmarks/RESULTS.md, Kernels).
            tile = WIDE_Q_TILE if use_wide_q_tile(batch, seqlen_q, heads, k.shape[1], head_dim, capability) else {}
            return _flash_attn_fwd(q, k, v, causal=False, **tile)[0]

        @flash4_attention.register_fake
        def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(q)

        _flash4_op = flash4_attention
    return _flash4_op


def flash4_available() -> bool:
    return (
        _import_error(AttentionBackend.FLASH4) is None
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability()[0] >= 9
    )


_flash3_op = None


def _flash3() -> AttentionFn:
    """FlashAttention-3's Hopper forward (the `fa3-fwd` wheel: the upstream hopper/ kernels, forward only, built
    against PyTorch's stable C ABI, so one build loads in several torch releases) as a torch custom op.

    It calls the extension's operator itself rather than its Python wrapper, which makes two empty tensors from a
    Python list on every call. One split (no split-KV): each row's softmax is accumulated over the keys in one
    order, as in FlashAttention-4 and cuDNN, and the output does not depend on the SM count that the kernel's split
    heuristic reads."""
    global _flash3_op
    if _flash3_op is None:
        import fa3_fwd._C  # noqa: F401 - registers torch.ops.fa3_fwd

        @torch.library.custom_op("wan_triton::flash3_attention", mutates_args=())
        def flash3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # The kernel needs unit stride in the head dimension only; V from the fused QKV projection has it.
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            return torch.ops.fa3_fwd.fwd(q, k, v, is_causal=False, num_splits=1)[0]

        @flash3_attention.register_fake
        def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(q)

        _flash3_op = flash3_attention
    return _flash3_op


def flash3_available() -> bool:
    return (
        _import_error(AttentionBackend.FLASH3) is None
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability()[0] == 9
    )


# Head sizes the kernels are built for (FlashAttention-4's forward; the fa3-fwd build's hdim flags).
FLASH4_HEAD_DIMS = (64, 96, 128, 192, 256)
FLASH3_HEAD_DIMS = (64, 96, 128, 192, 256)


# `auto`'s order on CUDA: the first kernel installed for the GPU and head size, else cuDNN SDPA.
AUTO_ORDER = (AttentionBackend.FLASH4, AttentionBackend.FLASH3)
_HEAD_DIMS = {AttentionBackend.FLASH3: FLASH3_HEAD_DIMS, AttentionBackend.FLASH4: FLASH4_HEAD_DIMS}


def _available(backend: AttentionBackend) -> bool:
    # Looked up by name at call time, so tests can stand in for the GPU checks.
    return {AttentionBackend.FLASH3: flash3_available, AttentionBackend.FLASH4: flash4_available}[backend]()


def _require_installed(backend: AttentionBackend) -> None:
    """A named kernel whose package is missing fails the load with what to install, not an ImportError from the
    first forward's call path."""
    if (exc := _import_error(backend)) is not None:
        raise ValueError(f"attention {backend.value} is not installed here ({exc}): {_PACKAGES[backend][1]}") from exc


# The fused kernels (FlashAttention-4 and -3, cuDNN's SDPA) take bf16 and fp16 only; an fp32 expert runs the
# reference math, which PyTorch's SDPA runs in fp32.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def resolve(
    backend: AttentionBackend | str, device: torch.device, head_dim: int, dtype: torch.dtype = torch.bfloat16
) -> AttentionBackend:
    """The kernel `backend` names for an expert on `device` with this head size and weight dtype: `auto` takes the
    first of AUTO_ORDER installed for the GPU and head size, else cuDNN's SDPA; off CUDA, and in fp32, the reference.
    A named kernel that cannot run there fails here, at load, with what would."""
    backend = AttentionBackend(backend)
    if backend in _HEAD_DIMS and head_dim not in _HEAD_DIMS[backend]:
        raise ValueError(f"{backend.value} attention supports head sizes {_HEAD_DIMS[backend]}, not {head_dim}")
    if backend not in (AttentionBackend.AUTO, AttentionBackend.REFERENCE) and dtype not in HALF_DTYPES:
        raise ValueError(
            f"{backend.value} attention runs in bfloat16 or float16, not {dtype}: "
            "precision float32 takes attention reference (or auto)"
        )
    if backend in _PACKAGES:
        _require_installed(backend)
    if backend != AttentionBackend.AUTO:
        return backend
    if device.type != "cuda" or dtype not in HALF_DTYPES:
        return AttentionBackend.REFERENCE
    for candidate in AUTO_ORDER:
        if head_dim in _HEAD_DIMS[candidate] and _available(candidate):
            return candidate
    return AttentionBackend.CUDNN


def attention_fn(backend: AttentionBackend) -> AttentionFn:
    match backend:
        case AttentionBackend.REFERENCE:
            return _sdpa
        case AttentionBackend.CUDNN:
            return _cudnn
        case AttentionBackend.FLASH4:
            return _flash4()
        case AttentionBackend.FLASH3:
            return _flash3()
    raise ValueError(f"no attention function for backend {backend!r}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' WanAttnProcessor rotary embedding with the same products: for each interleaved pair (x1, x2) with
    angle cos c = cos[2i], sin s = sin[2i+1], out[2i] = x1 c - x2 s and out[2i+1] = x1 s + x2 c.

    Written as x * (c, c) + pair_swapped(x) * (-s, s), the pair tables built on the small [S, head_dim] rotary
    tensors, rather than diffusers' strided writes or a stack of the two rotated halves of q and k: compiled, the
    q/k RMS norm and rotation then run in one kernel instead of two, and v is no longer copied before attention
    (benchmarks/RESULTS.md, Kernels). No tensor is made from host data, so a CUDA graph can capture it."""
    c, s = cos[..., 0::2], sin[..., 1::2]
    cos_pairs = torch.stack((c, c), dim=-1).flatten(-2)
    sin_pairs = torch.stack((-s, s), dim=-1).flatten(-2)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x * cos_pairs + swapped * sin_pairs).type_as(x)


class WanT2VAttnProcessor:
    """diffusers' WanAttnProcessor for text-to-video (no image branch), with a chosen attention kernel."""

    def __init__(self, attend: AttentionFn) -> None:
        self.attend = attend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query, key, value = self._project(attn, hidden_states, encoder_hidden_states, attention_mask)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rotate(query, *rotary_emb)
            key = _rotate(key, *rotary_emb)
        out = self._attention(query, key, value, encoder_hidden_states is None).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    @staticmethod
    def _project(attn, hidden_states, encoder_hidden_states, attention_mask):
        """Q, K, V [B, S, heads x D] from the (fused or separate) projections."""
        if attn.add_k_proj is not None:
            raise NotImplementedError("image-conditioned (I2V) attention is not supported by this processor")
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not used by Wan T2V")
        if not getattr(attn, "fused_projections", False):
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if encoder_hidden_states is None:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        return attn.to_q(hidden_states), key, value

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_attention: bool) -> torch.Tensor:
        """q, k, v: [B, S, heads, D] -> [B, S, heads, D]. The sequence-parallel processor overrides this."""
        return self.attend(q, k, v)


def fuse_projections(module: torch.nn.Module) -> None:
    """One GEMM for Q, K, V of self-attention and one for K, V of cross-attention, instead of three and two.

    The unfused weights are dropped: kept, they would hold a second copy (about 6 GB per A14B expert).
    """
    from diffusers.models.transformers.transformer_wan import WanAttention

    for attn in module.modules():
        if isinstance(attn, WanAttention) and not getattr(attn, "fused_projections", False):
            attn.fuse_projections()
            del attn.to_k, attn.to_v
            if not attn.is_cross_attention:
                del attn.to_q


def install(module: torch.nn.Module, backend: AttentionBackend | str, device: torch.device) -> AttentionBackend:
    """Set the attention kernel of every attention layer of a WanTransformer3DModel; returns the one chosen.

    With any kernel but the reference, the projections are fused too (the processor reads the fused weights), and
    each FFN's GELU runs in its input projection's epilogue (`wan_triton.kernels.ffn`); the reference keeps diffusers'
    math.
    """
    chosen = resolve(backend, device, module.config.attention_head_dim, module.dtype)
    if chosen != AttentionBackend.REFERENCE:
        module.set_attn_processor(WanT2VAttnProcessor(attention_fn(chosen)))
        fuse_projections(module)
        ffn.install(module)
    logger.info("denoiser attention: %s", chosen.value)
    return chosen
