"""Render haproxy.cfg for a set of Triton replicas from haproxy.cfg.template (beside this file).

    python model_repository/platform/loadbalancer/render.py --listen-port 8001 \
        --replica 10.0.0.11:8001:8000 --replica 10.0.0.12:8001:8000 > haproxy.cfg
    haproxy -db -f haproxy.cfg

Each --replica is HOST:GRPC_PORT:HTTP_PORT: requests go to the gRPC port, health checks to the HTTP port's
/v2/health/ready. Standard library only, so it runs wherever HAProxy does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "haproxy.cfg.template"


def parse_replica(text: str) -> tuple[str, int, int]:
    host, grpc_port, http_port = text.rsplit(":", 2)
    if not host or not grpc_port.isdigit() or not http_port.isdigit():
        raise argparse.ArgumentTypeError(f"replica {text!r}: expected HOST:GRPC_PORT:HTTP_PORT")
    return host, int(grpc_port), int(http_port)


def render(
    replicas: list[tuple[str, int, int]],
    listen_port: int,
    bind: str = "0.0.0.0",
    check_interval_ms: int = 1000,
    stats_port: int | None = None,
    check_timeout_s: int = 5,
) -> str:
    servers = "\n".join(
        f"    server replica{n} {host}:{grpc_port} proto h2 check port {http_port} check-proto h1"
        for n, (host, grpc_port, http_port) in enumerate(replicas, 1)
    )
    stats = ""
    if stats_port is not None:
        # HAProxy's own page of each replica's state and counters (`;csv` for machines).
        stats = f"frontend stats\n    bind {bind}:{stats_port}\n    stats enable\n    stats uri /stats\n"
    return TEMPLATE.read_text(encoding="utf-8").format(
        bind=bind,
        listen_port=listen_port,
        check_interval_ms=check_interval_ms,
        check_timeout_s=check_timeout_s,
        stats=stats,
        servers=servers,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replica", type=parse_replica, action="append", required=True, help="HOST:GRPC:HTTP")
    parser.add_argument("--listen-port", type=int, default=8001, help="the balancer's gRPC port")
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--check-interval-ms", type=int, default=1000)
    parser.add_argument("--check-timeout-s", type=int, default=5, help="how long a health check waits for its answer")
    parser.add_argument("--stats-port", type=int, help="serve HAProxy's statistics page on this port")
    args = parser.parse_args(argv)
    sys.stdout.write(
        render(args.replica, args.listen_port, args.bind, args.check_interval_ms, args.stats_port, args.check_timeout_s)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
