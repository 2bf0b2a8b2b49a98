"""Registers, spills and resident rows per SM of the one-pass FP8 activation quantization kernels
(wan_triton.kernels.fp8_rows_triton) at each launch, compiled for Hopper (sm_90a) without a GPU.

A memory-bound kernel needs many loads in flight on every SM: the rows (programs) an SM holds at once are bounded by
its 65,536 registers, 2,048 threads and 32 blocks. This compiles each kernel as a block launches it (the A14B widths:
5,120 for the norms, 13,824 for the FFN's GELU) with Triton's own compiler and ptxas, and reports what ptxas
allocates; timings are for `benchmarks/fp8_kernels.py --parts quant` on the GPU. Needs the `triton` package (on the GPU
host it comes with torch; elsewhere `pip install triton==3.6.0`, the GPU host's version), no GPU:

    python benchmarks/fp8_rows_registers.py --launches 0x8 0x16 512x4 1024x8 --out $OUT/fp8_rows_registers.json
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from wan_bench.records import run_record, write_json
from wan_triton.kernels import fp8_rows_triton as rows
from wan_triton.kernels.fp8_rows_triton import Launch

logger = logging.getLogger("benchmarks.fp8_rows_registers")

HOPPER = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM, THREADS_PER_SM, BLOCKS_PER_SM = 65536, 2048, 32
NORM_POINTERS = {
    "hidden_ptr": "*bf16",
    "delta_ptr": "*bf16",
    "gate_ptr": "*fp32",
    "hidden_out_ptr": "*bf16",
    "weight_ptr": "*fp32",
    "bias_ptr": "*fp32",
    "mod_scale_ptr": "*fp32",
    "mod_shift_ptr": "*fp32",
    "q_ptr": "*fp8e4nv",
    "scale_ptr": "*fp32",
    "rows_per_batch": "i32",
    "width": "i32",
    "eps": "fp32",
}
# name -> (row width, kernel pair (whole row, chunked), signature without the layout's constants, flags)
KERNELS = {
    "norm + modulation (self-attention's input)": (
        5120,
        (rows._norm_quantize_kernel, rows._norm_quantize_chunked_kernel),
        NORM_POINTERS,
        {"HAS_DELTA": False, "HAS_GATE": False, "HAS_AFFINE": False, "HAS_MODULATION": True},
    ),
    "residual + affine norm (cross-attention Q)": (
        5120,
        (rows._norm_quantize_kernel, rows._norm_quantize_chunked_kernel),
        NORM_POINTERS,
        {"HAS_DELTA": True, "HAS_GATE": True, "HAS_AFFINE": True, "HAS_MODULATION": False},
    ),
    "gelu (FFN out)": (
        13824,
        (rows._gelu_quantize_kernel, rows._gelu_quantize_chunked_kernel),
        {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "width": "i32"},
        {"APPLY_GELU": True},
    ),
}


def ptxas_path() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def compile_launch(name: str, launch: Launch) -> dict:
    """What ptxas allocates for kernel `name` at `launch`, and the rows an SM then holds at once."""
    width, (whole_row, chunked), pointers, flags = KERNELS[name]
    fn = chunked if launch.chunk else whole_row
    layout = (
        {"CHUNK": launch.chunk, "NUM_CHUNKS": triton.cdiv(width, launch.chunk), "UNROLL": launch.unroll}
        if launch.chunk
        else {"BLOCK": triton.next_power_of_2(width)}
    )
    constants = flags | layout
    signature = pointers | dict.fromkeys(constants, "constexpr")
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": launch.warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run(
            [ptxas_path(), "-v", "--gpu-name=sm_90a", ptx.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = re.search(r"(\d+) bytes spill stores", report)
    threads = 32 * launch.warps
    # Registers are allocated per warp in units of 256.
    per_warp = -(-registers * 32 // 256) * 256
    resident = min(REGISTERS_PER_SM // (per_warp * launch.warps), THREADS_PER_SM // threads, BLOCKS_PER_SM)
    return {
        "width": width,
        "registers": registers,
        "spill_bytes": int(spilled.group(1)) if spilled else 0,
        "rows_per_sm": resident,
        "warps_per_sm": resident * launch.warps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", nargs="+", required=True, help="CHUNKxWARPS[uUNROLL], as fp8_kernels.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result: dict = {
        **run_record("none: compiled for sm_90a"),
        "triton": triton.__version__,
        "served": {name: str(rows.launch_for(width)) for name, (width, *_) in KERNELS.items()},
        "kernels": {},
    }
    for name in KERNELS:
        result["kernels"][name] = {}
        for text in args.launches:
            entry = compile_launch(name, Launch.parse(text))
            result["kernels"][name][text] = entry
            logger.info("%-44s %-9s %s", name, text, entry)
    write_json(args.out, result)
    print(f"\ntriton {triton.__version__}, sm_90a; served: {result['served']}")
    print(f"{'kernel':44} {'launch':9} {'registers':>9} {'spill B':>7} {'rows/SM':>7} {'warps/SM':>8}")
    for name, launches in result["kernels"].items():
        for text, e in launches.items():
            print(f"{name:44} {text:9} {e['registers']:9} {e['spill_bytes']:7} {e['rows_per_sm']:7} "
                  f"{e['warps_per_sm']:8}")  # fmt: skip


if __name__ == "__main__":
    main()
