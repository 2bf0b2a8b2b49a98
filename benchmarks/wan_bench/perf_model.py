"""Analytic step-time model of a parallel plan, calibrated by one run on 1 and 2 GPUs, to predict 4 and 8.

    step_s(plan) = compute_s(plan) + comm_s(plan)

Assumptions (each one can be checked against the 2-GPU measurements of the same run):

1. Compute scales with the matmul FLOP each rank does, at the efficiency measured on one GPU:
   compute_s(plan) = one_gpu_step_s x flop_per_rank(plan) / flop_per_rank(1x1x1). Elementwise work (norms,
   modulation, rotary, the solver) is taken to scale the same way. Optimistic where a rank's GEMMs become small
   enough to lose efficiency (large tp). Where a rank's compute has been measured instead
   (benchmarks/parallel_compute.py times rank 0 of a plan on one GPU with the collectives stubbed out),
   `predict_from_compute` takes that figure and this assumption drops out.
2. Per-rank FLOP of one guided step (batch B = 2 / cfg per rank, S tokens, L = 512 text tokens, width d, FFN f,
   per layer): projections and FFN (8 S d^2 + 4 S d^2 + 4 S d f) / (ulysses x tp); cross-attention K, V on the
   text 4 L d^2 / tp (every ulysses rank repeats it); self-attention 4 S^2 d / (ulysses x tp); cross-attention
   4 S L d / (ulysses x tp). Unguided requests (B = 1) are not modelled.
3. No overlap of communication with compute (the implementation issues collectives in line), so their times add;
   except, with G Ulysses head groups (`ulysses_head_groups`), the all-to-alls around attention: a group's exchange
   runs while the previous group is attended, so only the first group's inputs and the last group's output, 1/G of
   their time, are waited for. That holds while a group's attention outlasts a group's exchange (at 720p on 8 H100s,
   about 40 ms of attention per layer against 2 ms of all-to-all) and takes NCCL's kernels not to slow the attention
   they run beside; neither is measured yet (it needs several GPUs).
4. A collective of M bytes per rank (its input) over n ranks takes latency + M x factor(n) / busbw, with
   NCCL-tests' bus bandwidth factors: all-reduce 2 (n - 1) / n, all-to-all (n - 1) / n, all-gather n - 1 (NCCL-tests
   counts an all-gather's output, n M, with the factor (n - 1) / n). The bus bandwidth measured
   for each kind on 2 GPUs is taken to hold for 4 and 8 GPUs of the same NVSwitch host (NVSwitch gives every GPU
   its full link bandwidth whatever the group size); a multi-node plan is out of scope.
5. Collectives per forward, per layer: tp: three all-reduces of [B, S/u, d] (self-attention out, cross-attention
   out, FFN out) and four of the q/k RMSNorm sums of squares ([B, S/u, 1] twice, [B, L, 1] twice); ulysses: three
   all-to-alls of [B, S/u, H/tp, D] (Q, K, V) and one back (the output); once per forward: a ulysses all-gather
   of the output head's tokens [B, S/u, C x 4]; once per step: the cfg all-gather of the noise prediction
   [1, C, T, h, w] (B = 1 per cfg rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wan_triton.config.plan import ParallelPlan

TEXT_LEN = 512


@dataclass(frozen=True)
class ModelShape:
    """The expert and the request size of one step."""

    num_layers: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    tokens: int  # S, the video's token sequence
    out_channels: int = 16
    patch_elems: int = 4  # p_t x p_h x p_w
    text_len: int = TEXT_LEN
    bytes_per_element: int = 2  # bf16 activations

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class Bandwidth:
    """Bus bandwidths (bytes / s) per collective kind, and the fixed cost of one collective call (s)."""

    all_reduce: float
    all_to_all: float
    all_gather: float
    latency_s: float = 0.0


@dataclass(frozen=True)
class Collective:
    kind: str  # "all_reduce", "all_to_all", "all_gather"
    group_size: int
    bytes_per_rank: float  # the tensor each rank passes in
    calls: int  # per step
    exposed: float = 1.0  # the fraction of its time not hidden behind compute (assumption 3)


@dataclass(frozen=True)
class Prediction:
    plan: ParallelPlan
    compute_s: float
    comm_s: float
    collectives: list[Collective] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s


def flop_per_rank(shape: ModelShape, plan: ParallelPlan) -> float:
    """Matmul FLOP of one guided step on one rank (assumption 2)."""
    s, d, f, text = shape.tokens, shape.dim, shape.ffn_dim, shape.text_len
    split = plan.ulysses * plan.tp
    batch = 2 / plan.cfg
    per_layer = (
        (8 * s * d * d + 4 * s * d * d + 4 * s * d * f) / split
        + 4 * text * d * d / plan.tp
        + 4 * s * s * d / split
        + 4 * s * text * d / split
    )
    return batch * shape.num_layers * per_layer


def collectives(shape: ModelShape, plan: ParallelPlan, ulysses_head_groups: int = 1) -> list[Collective]:
    """Every collective of one guided step (assumption 5), with the part of each that is waited for (3)."""
    b = 2 // plan.cfg
    s_local = shape.tokens // plan.ulysses
    e = shape.bytes_per_element
    n = shape.num_layers
    out: list[Collective] = []
    if plan.tp > 1:
        out.append(Collective("all_reduce", plan.tp, b * s_local * shape.dim * e, 3 * n))
        out.append(Collective("all_reduce", plan.tp, b * s_local * 4, 2 * n))  # fp32 sums of squares
        out.append(Collective("all_reduce", plan.tp, b * shape.text_len * 4, 2 * n))
    if plan.ulysses > 1:
        heads_local = shape.num_heads // plan.tp
        exchanged = b * s_local * heads_local * shape.head_dim * e
        g = ulysses_head_groups  # each of the 4 exchanges is made in g calls of 1/g of the heads
        out.append(Collective("all_to_all", plan.ulysses, exchanged / g, 4 * n * g, exposed=1 / g))
        out.append(Collective("all_gather", plan.ulysses, b * s_local * shape.out_channels * shape.patch_elems * e, 1))
    if plan.cfg > 1:
        out.append(Collective("all_gather", plan.cfg, shape.tokens * shape.out_channels * shape.patch_elems * e, 1))
    return out


def _bus_factor(kind: str, n: int) -> float:
    """Bytes on the bus per byte of a rank's input, NCCL-tests' convention (assumption 4)."""
    return {"all_reduce": 2 * (n - 1) / n, "all_to_all": (n - 1) / n, "all_gather": n - 1}[kind]


def collective_seconds(c: Collective, bw: Bandwidth) -> float:
    """Time of all calls of one collective (assumption 4), hidden or not."""
    busbw = getattr(bw, c.kind)
    return c.calls * (bw.latency_s + c.bytes_per_rank * _bus_factor(c.kind, c.group_size) / busbw)


def exposed_seconds(c: Collective, bw: Bandwidth) -> float:
    """The part of `collective_seconds` that adds to the step (assumption 3)."""
    return c.exposed * collective_seconds(c, bw)


def flop_scaled_compute(shape: ModelShape, plan: ParallelPlan, one_gpu_step_s: float) -> float:
    """A rank's compute seconds per step, from the one-GPU step time (assumption 1)."""
    return one_gpu_step_s * flop_per_rank(shape, plan) / flop_per_rank(shape, ParallelPlan())


def predict_from_compute(
    shape: ModelShape, plan: ParallelPlan, compute_s: float, bw: Bandwidth, ulysses_head_groups: int = 1
) -> Prediction:
    """The step time of `plan` from a rank's compute seconds per step (measured, e.g. by
    benchmarks/parallel_compute.py on one GPU, or FLOP-scaled) plus its collectives at these bandwidths, less what
    head groups hide (assumption 3; the compute must then be measured with those groups)."""
    config = {"num_attention_heads": shape.num_heads, "ffn_dim": shape.ffn_dim}
    plan.check_transformer(config, ulysses_head_groups if plan.ulysses > 1 else 1)
    if shape.tokens % plan.ulysses:
        raise ValueError(f"{shape.tokens} tokens do not split over ulysses {plan.ulysses}")
    cs = collectives(shape, plan, ulysses_head_groups)
    return Prediction(plan, compute_s, sum(exposed_seconds(c, bw) for c in cs), cs)


def predict(
    shape: ModelShape, plan: ParallelPlan, one_gpu_step_s: float, bw: Bandwidth, ulysses_head_groups: int = 1
) -> Prediction:
    """The step time of `plan`, from the one-GPU step time and the bandwidths measured in the same run."""
    plan.check_transformer({"num_attention_heads": shape.num_heads, "ffn_dim": shape.ffn_dim})
    compute_s = flop_scaled_compute(shape, plan, one_gpu_step_s)
    return predict_from_compute(shape, plan, compute_s, bw, ulysses_head_groups)


def plans_of(world_size: int, num_heads: int, ffn_dim: int) -> list[ParallelPlan]:
    """Every plan of this world size that fits the expert (cfg in {1, 2})."""
    plans = []
    for cfg in (1, 2):
        for ulysses in range(1, world_size + 1):
            if world_size % (cfg * ulysses):
                continue
            tp = world_size // (cfg * ulysses)
            plan = ParallelPlan(cfg=cfg, ulysses=ulysses, tp=tp)
            if plan.world_size == world_size and num_heads % (ulysses * tp) == 0 and ffn_dim % tp == 0:
                plans.append(plan)
    return plans
