"""Throughput and latency of a running server at several concurrencies, measured by Triton's perf_analyzer.

perf_analyzer 2.51 ships inside the tritonclient 2.51.0 wheel (installed by `make setup`); what else it needs is
in `wan_bench.perf_analyzer`. One perf_analyzer run per concurrency (gRPC, the requests of an `--input-data`
JSON file in `benchmarks/perf_analyzer/`); its CSV (`-f`) is parsed into a markdown table and a JSON file.
Against `make serve`:

    python benchmarks/perf_analyzer.py --url localhost:8001 --concurrency 1 2 4 8 \
        --input-data benchmarks/perf_analyzer/inputs_default.json \
        --out benchmarks/results/throughput/perf_analyzer_cpu.json

With `--image photo.png` every request also sends that file as the `image` input (image-to-video models): the
harness writes a copy of the input data with the file's bytes base64-encoded (perf_analyzer's `{"b64": ...}` form).

The streaming endpoint is measured with `--model wan_t2v_stream --streaming` (perf_analyzer's own `--streaming`: one
gRPC stream per concurrent client; a request's latency runs to its final response, past its progress responses).

Exit status 0 only when every perf_analyzer run exited 0 and wrote its CSV row; perf_analyzer itself stops with
an error when any request fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wan_bench.perf_analyzer import (
    PerfAnalyzerError,
    environment,
    missing_libraries,
    perf_analyzer_binary,
    with_image,
)
from wan_bench.records import run_record, write_json

INPUTS = Path(__file__).resolve().parent / "perf_analyzer"
US_PER_MS = 1000.0
ERROR_LINE = re.compile(r"\berror\b|\bfailed\b|\bunable\b", re.IGNORECASE)


def parse_csv(path: Path) -> dict[str, float]:
    """perf_analyzer's `-f` CSV, one row per concurrency: throughput in infer/s, latencies converted to ms."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != 1:
        raise PerfAnalyzerError(f"{path}: expected one measurement row, found {len(rows)}")
    row = rows[0]
    try:
        return {
            "concurrency": int(row["Concurrency"]),
            "throughput_infer_per_s": float(row["Inferences/Second"]),
            "p50_latency_ms": float(row["p50 latency"]) / US_PER_MS,
            "p90_latency_ms": float(row["p90 latency"]) / US_PER_MS,
            "p95_latency_ms": float(row["p95 latency"]) / US_PER_MS,
            "p99_latency_ms": float(row["p99 latency"]) / US_PER_MS,
            "server_queue_ms": float(row["Server Queue"]) / US_PER_MS,
            "server_compute_infer_ms": float(row["Server Compute Infer"]) / US_PER_MS,
        }
    except (KeyError, ValueError) as error:
        raise PerfAnalyzerError(f"{path}: unexpected CSV {row}: {error}") from error


def input_data_file(args: argparse.Namespace, workdir: Path) -> Path:
    """The input-data file perf_analyzer reads: `--input-data`, or with `--image` a copy sending the image too."""
    if args.image is None:
        return args.input_data
    path = workdir / "input_data_with_image.json"
    if not path.exists():
        path.write_text(json.dumps(with_image(json.loads(args.input_data.read_text()), args.image.read_bytes())))
    return path


def run_concurrency(args: argparse.Namespace, concurrency: int, workdir: Path) -> tuple[dict[str, float], str]:
    csv_path = workdir / f"concurrency_{concurrency}.csv"
    cmd = [
        str(perf_analyzer_binary()),
        "-m",
        args.model,
        "-u",
        args.url,
        "-i",
        "grpc",
        "--input-data",
        str(input_data_file(args, workdir)),
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        # Count windows: requests take long even on the tiny CPU model (benchmarks/RESULTS.md), so fixed time windows
        # would hold few of them.
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        str(args.request_count),
        "--stability-percentage",
        str(args.stability_pct),
        "--max-trials",
        str(args.max_trials),
        "-f",
        str(csv_path),
    ]
    if args.streaming:
        cmd.append("--streaming")
    started = time.monotonic()
    result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=args.timeout_s)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise PerfAnalyzerError(
            f"perf_analyzer exited {result.returncode} at concurrency {concurrency}:\n{' '.join(cmd)}\n{output[-4000:]}"
        )
    row = parse_csv(csv_path)
    row["wall_s"] = time.monotonic() - started
    # The client-side count of the last (reported) measurement, and any line perf_analyzer flagged as a problem.
    counts = re.findall(r"Client:\s+Request count: (\d+)", output)
    row["requests"] = int(counts[-1]) if counts else 0
    row["errors"] = [line.strip() for line in output.splitlines() if ERROR_LINE.search(line)]
    if row["errors"] or not row["requests"]:
        raise PerfAnalyzerError(f"perf_analyzer at concurrency {concurrency} reported problems:\n{output[-4000:]}")
    return row, output


def markdown_table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| concurrency | throughput (infer/s) | p50 latency (ms) | p90 latency (ms) | p99 latency (ms) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['throughput_infer_per_s']:.2f} | {r['p50_latency_ms']:.0f} "
            f"| {r['p90_latency_ms']:.0f} | {r['p99_latency_ms']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    parser.add_argument("--model", default="wan_t2v")
    parser.add_argument(
        "--streaming", action="store_true", help="a decoupled model over gRPC streams (e.g. --model wan_t2v_stream)"
    )
    parser.add_argument("--input-data", type=Path, default=INPUTS / "inputs_default.json")
    parser.add_argument(
        "--image", type=Path, help="image-to-video: send this PNG, JPEG or WebP file as every request's `image` input"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--request-count", type=int, default=16, help="requests per measurement window")
    parser.add_argument("--stability-pct", type=float, default=25, help="allowed spread of 3 consecutive windows")
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=1800, help="per perf_analyzer run")
    parser.add_argument("--out", type=Path, help="JSON results; the markdown table goes next to it (.md)")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency values must be >= 1")
    if args.image is not None and not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_libraries()
    if missing:
        print("perf_analyzer cannot start; missing: " + "; ".join(missing), file=sys.stderr)
        return 1
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="perf_analyzer_") as tmp:
            for concurrency in args.concurrency:
                row, _ = run_concurrency(args, concurrency, Path(tmp))
                print(f"concurrency {concurrency}: {row['throughput_infer_per_s']:.2f} infer/s", file=sys.stderr)
                rows.append(row)
    except (PerfAnalyzerError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = markdown_table(rows)
    print(table)
    if args.out:
        result = {
            **run_record(argv=argv),
            "model": args.model,
            "input_data": json.loads(args.input_data.read_text())["data"],
            "image": None if args.image is None else {"file": args.image.name, "bytes": args.image.stat().st_size},
            "perf_analyzer": str(perf_analyzer_binary()),
            "rows": rows,
        }
        write_json(args.out, result)
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
