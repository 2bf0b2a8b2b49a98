"""Expert swapping: both Wan2.2 experts' weights wait in pinned host memory and one device copy of the
architecture holds whichever expert runs, its weights overwritten block by block while the previous step runs.

Why: an A14B expert is 28.6 GB in bf16, so both resident leave an 80 GB GPU too little for 720p activations
(measured peaks: benchmarks/RESULTS.md, Memory).
The experts have the same architecture, so instead of holding two device modules, the device module's parameters
are overwritten in place with the other expert's weights. The copy is split per transformer block and issued on a
side stream during the last step before the switch: as soon as block `l` has run its last forward with the old
weights, block `l` of the new expert is copied in (about 0.7 GB, tens of milliseconds over PCIe), while blocks
`l+1...` still compute. The next step's block `l` waits only for its own copy. A 720p step takes far longer than
the whole expert's copy, so the switch costs no visible time and device memory holds one expert.

Because the parameters keep their storage, compiled blocks (regional torch.compile) and captured CUDA graphs stay
valid for both experts.

Used by `components.build_denoiser` when the deployment's denoiser has `expert_residency: swap` (or `auto` and two
experts would not fit); the denoising loop tells it which expert the next step needs (`Denoiser.__call__`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wan_triton.model.engine import Engine

logger = logging.getLogger(__name__)

# `auto` keeps both experts resident when their weights take at most this share of the device's memory; the rest is
# for activations (720p with guidance as a batch of 2; benchmarks/RESULTS.md, Memory).
RESIDENT_WEIGHT_SHARE = 0.75


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def choose_residency(setting: str, expert_bytes: int, device: torch.device) -> str:
    """`resident` or `swap` for a deployment's `expert_residency` setting (`auto` decides by device memory)."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "resident"
    total = torch.cuda.get_device_properties(device).total_memory
    return "resident" if 2 * expert_bytes <= RESIDENT_WEIGHT_SHARE * total else "swap"


@dataclass
class _Group:
    """The device parameters of one part of the module (a block, or everything outside the blocks) and the
    matching pinned host copies of each expert."""

    device_params: list[torch.Tensor]
    host_params: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None  # recorded on the copy stream after this group's last copy

    def copy_in(self, expert: str) -> None:
        for dst, src in zip(self.device_params, self.host_params[expert], strict=True):
            dst.copy_(src, non_blocking=True)


class _SwapBlock(torch.nn.Module):
    """Wraps one transformer block: waits for its pending weight copy before running, schedules the next copy
    after. Kept outside the block so regional torch.compile still compiles the block itself."""

    def __init__(self, block: torch.nn.Module, on_enter: Callable[[], None], on_exit: Callable[[], None]) -> None:
        super().__init__()
        self.block = block
        self._on_enter = on_enter
        self._on_exit = on_exit

    def forward(self, *args, **kwargs):
        self._on_enter()
        out = self.block(*args, **kwargs)
        self._on_exit()
        return out


class ExpertSwapper:
    """One device module, two experts' weights in pinned host memory.

    Args:
        module: the device module (a WanTransformer3DModel with its attention processor installed and projections
            fused as serving runs it); its current weights are expert `resident`.
        host_states: for each expert name, its parameters by name (the module's `named_parameters()` names), on the
            host. They are pinned here when the device is CUDA.
        resident: the expert whose weights `module` holds now.
    """

    def __init__(self, module: torch.nn.Module, host_states: dict[str, dict[str, torch.Tensor]], resident: str):
        self.module = module
        self.device = next(module.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
        params = dict(module.named_parameters())
        names = list(params)
        for expert, state in host_states.items():
            layout = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}
            if layout != {n: (tuple(p.shape), p.dtype) for n, p in params.items()}:
                raise ValueError(
                    f"expert {expert!r} does not have the device module's parameter names, shapes and "
                    "dtypes: swapping needs experts of one architecture"
                )
        self.experts = tuple(host_states)
        pinned = {
            e: {n: (t.pin_memory() if on_cuda and not t.is_pinned() else t) for n, t in s.items()}
            for e, s in host_states.items()
        }

        def group(belongs: Callable[[str], bool]) -> _Group:
            chosen = [n for n in names if belongs(n)]
            g = _Group([params[n].data for n in chosen])
            for expert in self.experts:
                g.host_params[expert] = [pinned[expert][n] for n in chosen]
            return g

        self.blocks = [group(lambda n, i=i: n.startswith(f"blocks.{i}.")) for i in range(len(module.blocks))]
        self.rest = group(lambda n: not n.startswith("blocks."))
        for i, block in enumerate(module.blocks):
            module.blocks[i] = _SwapBlock(block, self._enter(self.blocks[i]), self._exit(self.blocks[i]))
        self.resident: str | None = resident
        self._next: str | None = None  # expert the step after the coming forward needs (set by the loop)
        self._pending: str | None = None  # expert being copied in during the running forward
        self.swaps_overlapped = 0  # swaps done during a forward (for tests and logs)
        self.swaps_blocking = 0
        self.host_bytes = sum(t.numel() * t.element_size() for s in pinned.values() for t in s.values())
        logger.info("expert swapping: %d experts in %.1f GB of host memory", len(self.experts), self.host_bytes / 1e9)

    # --- called by the denoising loop and the engines ---

    def prefetch(self, expert: str) -> None:
        """The step after the coming forward runs `expert`: copy it in during that forward if it is not resident."""
        self._next = expert

    def activate(self, expert: str) -> None:
        """Make `expert` resident before a forward; a blocking copy if no earlier forward prefetched it."""
        if expert not in self.experts:
            raise ValueError(f"unknown expert {expert!r}; expected one of {self.experts}")
        if self.resident == expert:
            return
        for g in [*self.blocks, self.rest]:
            self._wait(g)  # a copy still in flight on the side stream must land before this one overwrites it
            g.copy_in(expert)
        self.resident = expert
        self.swaps_blocking += 1
        logger.info("expert swap to %s (blocking)", expert)

    def forward(self, fn: Callable[[], torch.Tensor], block_hooks: bool = True) -> torch.Tensor:
        """Run one forward of the resident expert; copy in the prefetched expert as blocks finish.

        Args:
            fn: the forward.
            block_hooks: False when `fn` does not run the blocks' Python wrappers (a CUDA-graph replay): every
                pending copy is then waited for up front, and the caller must not pass such an `fn` while
                `swap_pending()` (the per-block copies are issued from those wrappers).
        """
        target, self._next = self._next, None
        self._pending = target if target is not None and target != self.resident else None
        if self._pending is not None and not block_hooks:
            raise RuntimeError("a forward without block hooks cannot carry an expert swap")
        self._wait(self.rest)
        if not block_hooks:
            for g in self.blocks:
                self._wait(g)
        try:
            out = fn()
        except BaseException:
            self.resident, self._pending = None, None  # possibly half-copied: the next activate copies everything
            raise
        if self._pending is not None:
            self._schedule(self.rest, self._pending)
            self.resident, self._pending = self._pending, None
            self.swaps_overlapped += 1
        return out

    def swap_pending(self) -> bool:
        """Whether the coming forward will copy in another expert (so it must run the blocks' wrappers)."""
        return self._next is not None and self._next != self.resident

    # --- internals ---

    def _enter(self, g: _Group) -> Callable[[], None]:
        return lambda: self._wait(g)

    def _exit(self, g: _Group) -> Callable[[], None]:
        def after_block() -> None:
            if self._pending is not None:
                self._schedule(g, self._pending)

        return after_block

    def _wait(self, g: _Group) -> None:
        if g.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(g.ready)
            g.ready = None

    def _schedule(self, g: _Group, expert: str) -> None:
        if self.copy_stream is None:
            g.copy_in(expert)  # CPU: no streams; the block has finished, so copying now is safe
            return
        compute = torch.cuda.current_stream(self.device)
        done = compute.record_event()
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(done)  # the block's kernels have read the old weights
            g.copy_in(expert)
            g.ready = self.copy_stream.record_event()


class SwappedExpert(Engine):
    """One expert of an `ExpertSwapper`: makes it resident, then runs the shared device module.

    Args:
        eager: the engine over the device module.
        graphed: optional CUDA-graph engine over the same module, used for every forward that carries no swap
            (a graph replay skips the blocks' Python wrappers that issue the per-block copies).
    """

    def __init__(self, name: str, swapper: ExpertSwapper, eager: Engine, graphed: Engine | None = None) -> None:
        self.name = name
        self.swapper = swapper
        self.eager = eager
        self.graphed = graphed
        self.kind = eager.kind

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.swapper.activate(self.name)
        if self.graphed is None or self.swapper.swap_pending():
            return self.swapper.forward(lambda: self.eager.run(inputs))
        return self.swapper.forward(lambda: self.graphed.run(inputs), block_hooks=False)
