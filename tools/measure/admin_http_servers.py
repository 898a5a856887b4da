"""Measure the admin API's HTTP server: the former hand-written asyncio server against
aiohttp's (issue 16 item 3).

Each server runs in its own child process serving ``GET /healthz`` (the baseline with a
handler answering the same JSON; aiohttp with the real :class:`controlplane.admin.AdminApi`,
so the Host check is included). The parent sends, per server: ``requests`` sequential
requests on new connections (latency p50 / p90 / p99), then the same number from
``clients`` threads at once (requests/s). Both servers close or may keep connections;
every request here opens its own, as curl does. Run from the repository root with
``generated/python`` on ``PYTHONPATH``:

    python -m tools.measure.admin_http_servers [--requests 2000] [--clients 8]

The figures go into the commit message and docs/ (decisions, benchmarks); there are no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

HOST = "127.0.0.1"


def _serve(kind: str, port: int) -> None:
    async def main() -> None:
        if kind == "baseline":
            from tools.measure.admin_http_baseline import (  # noqa: PLC0415
                HttpServer,
                Request,
                Response,
                json_response,
            )

            async def handler(request: Request) -> Response:
                return json_response(200, {"status": "ok", "version": "0-abc"})

            server: Any = HttpServer(handler)
            await server.start(HOST, port)
        else:
            from controlplane.admin import (  # noqa: PLC0415
                AdminApi,
                AdminLimits,
                AdminServer,
                default_allowed_hosts,
            )
            from controlplane.ads import AdsServer  # noqa: PLC0415
            from controlplane.table import RouteTable  # noqa: PLC0415
            from engine.registry import PolicyRegistry  # noqa: PLC0415

            table = RouteTable(PolicyRegistry([]))
            limits = AdminLimits(allowed_hosts=default_allowed_hosts(HOST), tokens=None)
            api = AdminApi(table, AdsServer(table), limits)
            server = AdminServer(api)
            await server.start(HOST, port)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def _get(port: int) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        reply = conn.getresponse()
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"status {reply.status}")
    finally:
        conn.close()
    return time.perf_counter() - started


def _measure(kind: str, requests: int, clients: int) -> dict[str, float]:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-m", "tools.measure.admin_http_servers", "--serve", kind, str(port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        for _ in range(50):  # warm up
            _get(port)
        latencies = sorted(_get(port) for _ in range(requests))
        per_client = requests // clients

        def run() -> None:
            for _ in range(per_client):
                _get(port)

        threads = [threading.Thread(target=run) for _ in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds(child.pid)
    finally:
        child.kill()
        child.wait()
    q = statistics.quantiles(latencies, n=100)
    return {
        "p50_ms": q[49] * 1000,
        "p90_ms": q[89] * 1000,
        "p99_ms": q[98] * 1000,
        "rps": per_client * clients / elapsed,
        "server_cpu_s": cpu,
    }


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()  # noqa: SIM115

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve[0], int(args.serve[1]))
        return
    print(f"GET /healthz, new connection per request, {args.requests} requests")
    print(
        f"{'server':<10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>8}  "
        f"({args.clients} clients)  server CPU s"
    )
    for kind in ("baseline", "aiohttp", "baseline", "aiohttp"):
        r = _measure(kind, args.requests, args.clients)
        print(
            f"{kind:<10} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{r['rps']:8.0f}  {'':>14}{r['server_cpu_s']:8.2f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
