"""Name the functions in a Triton crash stack: the `N# 0x... in .../libtriton_python.so` frames that tritonserver
prints on a fatal signal carry only run-time addresses, but the library keeps its (local) symbol table.

The load address is not printed, so it is found: the one page-aligned base at which every frame but the innermost
lands just after a `call` instruction (a return address). Needs binutils (`objdump`, `nm`).

    python tools/triton_crash_stack.py tritonserver.log [--library path/to/libtriton_python.so]

The library defaults to the one in the installed Triton wheel (the one `make serve` runs).
"""

from __future__ import annotations

import argparse
import bisect
import re
import subprocess
import sys
from pathlib import Path

_FRAME = re.compile(r"^\s*\d+# 0x([0-9A-Fa-f]+) in (\S+)$")
_INSTRUCTION = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)")
# Far enough to cover any shared library's text: the base is searched below the lowest frame, a page at a time.
MAX_SPAN = 1 << 26


def crash_stacks(log_text: str, library_name: str) -> list[list[int]]:
    """Each stack in the log (frames in order, a new stack at each frame 0) as the addresses inside `library_name`."""
    stacks: list[list[int]] = []
    for line in log_text.splitlines():
        m = _FRAME.match(line)
        if not m:
            continue
        if line.strip().startswith("0#"):
            stacks.append([])
        if stacks and Path(m.group(2)).name == library_name:
            stacks[-1].append(int(m.group(1), 16))
    return [s for s in stacks if s]


def return_addresses(library: Path) -> set[int]:
    """Offsets in `library` that directly follow a call instruction."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True)
    out.check_returncode()
    after_call: set[int] = set()
    previous_was_call = False
    for line in out.stdout.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        if previous_was_call:
            after_call.add(int(m.group(1), 16))
        previous_was_call = m.group(2).startswith("call")
    return after_call


def symbols(library: Path) -> tuple[list[int], list[str]]:
    """Function symbols of `library` (local ones included), sorted by offset, demangled."""
    out = subprocess.run(["nm", "-C", "--defined-only", str(library)], capture_output=True, text=True)
    out.check_returncode()
    table = []
    for line in out.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            table.append((int(parts[0], 16), parts[2]))
    table.sort()
    return [a for a, _ in table], [n for _, n in table]


def find_base(frames: list[int], after_call: set[int]) -> int | None:
    lowest = min(frames) & ~0xFFF
    for offset in range(0, MAX_SPAN, 0x1000):
        base = lowest - offset
        if all(f - base in after_call for f in frames[1:]):
            return base
    return None


def name_stack(frames: list[int], library: Path) -> list[str]:
    """`offset function+delta` per frame; the frames stay unnamed when no base fits."""
    base = find_base(frames, return_addresses(library))
    if base is None:
        return [f"{f:#x} (no load address fits these frames)" for f in frames]
    offsets, names = symbols(library)
    named = []
    for f in frames:
        i = bisect.bisect_right(offsets, f - base) - 1
        named.append(f"{f - base:#x} {names[i]}+{f - base - offsets[i]:#x}" if i >= 0 else f"{f - base:#x} ?")
    return named


def default_library() -> Path:
    from wan_triton.tritonserver.server import _pytriton_root

    return _pytriton_root() / "backends" / "python" / "libtriton_python.so"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="tritonserver's log holding the crash stack")
    parser.add_argument("--library", type=Path, default=None, help="default: the installed Triton wheel's")
    args = parser.parse_args(argv)
    args.library = args.library or default_library()
    stacks = crash_stacks(args.log.read_text(errors="replace"), args.library.name)
    if not stacks:
        print(f"no frames in {args.library.name} in {args.log}", file=sys.stderr)
        return 1
    for number, frames in enumerate(stacks, 1):
        print(f"stack {number} (innermost first):")
        for line in name_stack(frames, args.library):
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
