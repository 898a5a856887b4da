"""rateLimit v2 local vs redis: added latency and engine CPU per request, measured.

Run from the repository root (needs ``redis-server`` on PATH; ``generated/python`` holds
the xDS protos, which any plain ``pytest`` run generates)::

    PYTHONPATH=.:generated/python python tools/bench_redis/backends.py [--requests 3000]

Starts a redis-server on a free 127.0.0.1 port and ONE engine process (``--workers 1``)
serving four routes: ``none`` (empty chain), ``v1`` (rateLimit v1.0.0), ``local`` and
``redis`` (rateLimit v2.0.0 with each backend; limits high enough that every request
passes, so every request takes the full decision path). A grpc.aio client plays Envoy:
per request one ``Process`` stream with request headers and, where the chain has a
response phase (v2 always has: it writes the RateLimit headers there), the response
headers. Printed per route and concurrency: client-side median and p99 latency per
request, and the engine process's CPU time per request (``/proc/<pid>/stat``), each
also as the difference from the empty chain. A shared 2-core machine is noisy: compare
routes of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.transport.testing import ExtProcClient, request_headers, response_headers
from policies.rateLimit.testing import running_redis
from tests.e2e.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
ENGINE = (
    "import sys\n"
    "from engine.main import main\n"
    "from engine.registry import PolicyRegistry, load_policy\n"
    "folders = ['policies/rateLimit/v1.0.0', 'policies/rateLimit/v2.0.0']\n"
    "sys.exit(main(sys.argv[1:], registry=PolicyRegistry(load_policy(f) for f in folders)))\n"
)
HIGH = {"requestsPerSecond": 1_000_000, "burstSize": 1_000_000}
ROUTES: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "v1": [{"name": "rateLimit", "version": "v1.0.0", "parameters": HIGH}],
    "local": [{"name": "rateLimit", "version": "v2.0.0", "parameters": HIGH}],
    "redis": [
        {
            "name": "rateLimit",
            "version": "v2.0.0",
            "parameters": {**HIGH, "backend": "redis", "redisUrlEnv": "BENCH_REDIS_URL"},
        }
    ],
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_serving(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("engine exited")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError("engine not SERVING")


async def one_request(client: ExtProcClient, route: str, index: int) -> float:
    started = time.perf_counter()
    stream = client.open(route)
    reply = await stream.send(
        request_headers(
            "/x", headers={"x-user": "bench"}, attributes={"source.address": "10.1.1.1"}
        )
    )
    # v2 declares the response phase (RateLimit headers on allowed responses).
    if reply is not None and route in ("local", "redis"):
        await stream.send(response_headers(200))
    await stream.finish()
    return time.perf_counter() - started


async def measure(port: int, pid: int, route: str, requests: int, concurrency: int) -> list[float]:
    async with ExtProcClient(f"127.0.0.1:{port}") as client:
        for i in range(200):  # warm up: connections, script cache, JIT-free but caches
            await one_request(client, route, i)
        latencies: list[float] = []
        cpu0 = cpu_seconds(pid)

        async def worker(offset: int) -> None:
            for i in range(offset, requests, concurrency):
                latencies.append(await one_request(client, route, i))

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        cpu = (cpu_seconds(pid) - cpu0) / requests
    latencies.sort()
    return [statistics.median(latencies), latencies[int(len(latencies) * 0.99)], cpu]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        help="extra engine argument, e.g. --engine-arg=--metrics-listen=127.0.0.1:0",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp, running_redis(Path(tmp)) as redis:
        config = Path(tmp) / "config.yaml"
        config.write_text(
            yaml.safe_dump({"routes": {k: {"policies": v} for k, v in ROUTES.items()}})
        )
        port = free_port()
        env = {**os.environ, "BENCH_REDIS_URL": redis.url}
        argv = ["--config", str(config), "--listen", f"127.0.0.1:{port}", "--workers", "1"]
        engine = subprocess.Popen(
            [sys.executable, "-c", ENGINE, *argv, *args.engine_arg, "--log-level", "WARNING"],
            cwd=ROOT,
            env=env,
        )
        try:
            wait_serving(port, engine)
            print(f"{args.requests} requests per route; engine pid {engine.pid}")
            for concurrency in levels:
                results = {
                    route: asyncio.run(measure(port, engine.pid, route, args.requests, concurrency))
                    for route in ROUTES
                }
                base = results["none"]
                print(f"-- {concurrency} in flight")
                for route, (median, p99, cpu) in results.items():
                    added_latency, added_cpu = (median - base[0]) * 1e6, (cpu - base[2]) * 1e6
                    print(
                        f"{route:6s} latency median {median * 1e6:7.0f} us (+{added_latency:5.0f})"
                        f"  p99 {p99 * 1e6:7.0f} us   engine CPU {cpu * 1e6:6.0f} us/request"
                        f" (+{added_cpu:5.0f})"
                    )
        finally:
            engine.send_signal(signal.SIGTERM)
            engine.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
