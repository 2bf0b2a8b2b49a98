"""What tests compare against and how: diffusers' reference frames and the parity tolerance, the supervisor's log
lines of a stopped request, the log of a server's stop, and the order of Ulysses exchanges in generated code."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def reference_frames(checkpoint: Path, **call) -> np.ndarray:
    """diffusers' WanPipeline on the same weights, output_type="np", as uint8 frames [F, H, W, 3]."""
    from diffusers import WanPipeline

    seed = call.pop("seed")
    pipe = WanPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call).frames[0]
    return (out * 255).round().astype(np.uint8)


def reference_i2v_frames(checkpoint: Path, image, **call) -> np.ndarray:
    """diffusers' WanImageToVideoPipeline (I2V-A14B, and TI2V-5B with an image) from the same checkpoint, given
    the PIL `image`, output_type="np", as uint8 frames [F, H, W, 3]."""
    from diffusers import WanImageToVideoPipeline

    seed = call.pop("seed")
    pipe = WanImageToVideoPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(image=image, generator=generator, output_type="np", **call).frames[0]
    return (out * 255).round().astype(np.uint8)


def assert_frames_close(ours: np.ndarray, ref: np.ndarray, max_levels: int = 2, mean_levels: float = 0.5) -> None:
    """The parity tolerance: at most `max_levels` uint8 levels apart anywhere, `mean_levels` on average."""
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= max_levels and diff.mean() <= mean_levels, (int(diff.max()), float(diff.mean()))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention: torch's SDPA, [B, S, h, D] in and out, as the attention backends take it."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """The relative L2 distance of `a` from the reference `b`."""
    return float((a - b).norm() / b.norm())


def logged_stops(log: str) -> list[int]:
    """The steps after which a worker group's ranks stopped a request, from the supervisor's log lines
    (wan_triton.workers.supervisor: "... the ranks stopped the request after step N")."""
    return [int(step) for step in re.findall(r"the ranks stopped the request after step (\d+)", log)]


# --- Ulysses exchanges in head groups: the order of starts, waits and attention -------------------------------


def assert_one_group_ahead(order: list[str], groups: int) -> None:
    """order: "start" (an exchange), "wait", "attend". Before group g is attended, the Q, K, V of groups up to g + 1
    and the outputs of groups before g have been sent, and only the inputs of groups up to g waited for."""
    attends = [i for i, op in enumerate(order) if op == "attend"]
    assert len(attends) == groups, order
    for g, at in enumerate(attends):
        assert order[:at].count("start") == 3 * min(g + 2, groups) + g, order
        assert order[:at].count("wait") == 3 * (g + 1), order
    assert order.count("start") == 4 * groups and order.count("wait") == 4 * groups, order


# inductor's generated code: a started all-to-all (its buffer), a wait (for a buffer), the attention op.
A2A_CALL = re.compile(r"(\w+) = torch\.ops\._c10d_functional\.all_to_all_single\.default\(")
WAIT_CALL = re.compile(r"torch\.ops\._c10d_functional\.wait_tensor\.default\((\w+)\)")
ATTEND_CALL = re.compile(r"torch\.ops\.aten\._scaled_dot_product\w*\.default\(")


def calls_in(code: str) -> list[str]:
    """The order of all-to-all starts, their waits (not other collectives') and attention calls in generated code."""
    order, exchanged = [], set()
    for line in code.splitlines():
        if started := A2A_CALL.search(line):
            exchanged.add(started[1])
            order.append("start")
        elif (waited := WAIT_CALL.search(line)) and waited[1] in exchanged:
            order.append("wait")
        elif ATTEND_CALL.search(line):
            order.append("attend")
    return order


def assert_self_attention_one_group_ahead(code: str, groups: int) -> None:
    """In one compiled block: its self-attention's exchanges in `groups` groups, one ahead (the cross-attention,
    without exchanges, comes after the last of them)."""
    calls = calls_in(code)
    last_exchange = max(i for i, op in enumerate(calls) if op != "attend")
    assert_one_group_ahead(calls[: last_exchange + 1], groups)


# What Triton's log shows when a process of the server (a Python-backend stub included) died of SIGSEGV.
CRASH_MARKERS = ("Segmentation fault", "Signal (11)")


def assert_no_crash_in_log(log_path: Path) -> None:
    """The server's log shows no segfault, at any time up to and including its stop (a stub that crashes at unload
    does not change the server's exit code)."""
    log = log_path.read_text(encoding="utf-8", errors="replace")
    found = [line for line in log.splitlines() if any(marker in line for marker in CRASH_MARKERS)]
    assert not found, "\n".join(found[:10])
