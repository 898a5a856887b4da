"""Measure the maintained async Redis clients on rateLimit v2's one call: EVALSHA of gcra.lua.

Run (needs ``redis-server`` on PATH and the clients installed in the interpreter)::

    python tools/bench_redis/clients.py [--calls 20000] [--concurrency 64]

It starts its own ``redis-server`` on a free 127.0.0.1 port (no persistence) and stops it.
For each client it prints, per call: median and p99 latency of sequential awaits, CPU
time of the client process (``time.process_time``), and the throughput with
``--concurrency`` calls in flight. Clients missing from the interpreter are skipped
with a note. Figures are noisy on a shared 2-core machine: read ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SCRIPT = (HERE.parents[2] / "policies/rateLimit/v2.0.0/gcra.lua").read_text()
Call = Callable[[str], Awaitable[Any]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(5)


async def redis_py(port: int, hiredis: bool) -> tuple[Call, Callable[[], Awaitable[None]]]:
    aredis: Any = importlib.import_module("redis.asyncio")
    parsers: Any = importlib.import_module("redis._parsers")
    _AsyncHiredisParser, _AsyncRESP2Parser = parsers._AsyncHiredisParser, parsers._AsyncRESP2Parser
    pool = aredis.ConnectionPool(
        host="127.0.0.1",
        port=port,
        parser_class=_AsyncHiredisParser if hiredis else _AsyncRESP2Parser,
        max_connections=128,
    )
    client = aredis.Redis(connection_pool=pool)
    script = client.register_script(SCRIPT)

    async def call(key: str) -> Any:
        return await script(keys=[key], args=[200000, 1000000])

    return call, client.aclose


async def coredis_client(port: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    coredis: Any = importlib.import_module("coredis")
    client: Any = coredis.Redis(host="127.0.0.1", port=port, max_connections=128)
    script = client.register_script(SCRIPT)
    entered = None
    if hasattr(client, "__aenter__"):  # coredis 5+: the client is an async context manager
        entered = await client.__aenter__()
        script = entered.register_script(SCRIPT)

    async def call(key: str) -> Any:
        return await script(keys=[key], args=[200000, 1000000])

    async def close() -> None:
        if entered is not None:
            await client.__aexit__(None, None, None)

    return call, close


async def glide_client(port: int) -> tuple[Call, Callable[[], Awaitable[None]]]:
    glide: Any = importlib.import_module("glide")
    client = await glide.GlideClient.create(
        glide.GlideClientConfiguration([glide.NodeAddress("127.0.0.1", port)], request_timeout=1000)
    )
    script = glide.Script(SCRIPT)

    async def call(key: str) -> Any:
        return await client.invoke_script(script, keys=[key], args=["200000", "1000000"])

    return call, client.close


CLIENTS: dict[str, tuple[str, Callable[[int], Awaitable[tuple[Call, Any]]]]] = {
    "redis-py asyncio (pure-Python parser)": ("redis", lambda p: redis_py(p, hiredis=False)),
    "redis-py asyncio + hiredis": ("hiredis", lambda p: redis_py(p, hiredis=True)),
    "coredis": ("coredis", coredis_client),
    "valkey-glide": ("glide", glide_client),
}


async def measure(
    make: Callable[[int], Awaitable[tuple[Call, Any]]], port: int, calls: int, concurrency: int
) -> str:
    call, close = await make(port)
    try:
        for i in range(2000):  # warm up: connections, script cache
            await call(f"warm:{i % 50}")
        latencies = []
        cpu0 = time.process_time()
        for i in range(calls):
            t0 = time.perf_counter()
            await call(f"seq:{i % 1000}")
            latencies.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu0) / calls
        latencies.sort()

        async def worker(n: int, base: int) -> None:
            for i in range(n):
                await call(f"par:{(base + i) % 1000}")

        per = calls // concurrency
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(worker(per, w * per) for w in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu_par = (time.process_time() - cpu0) / (per * concurrency)
        rate = per * concurrency / wall
        return (
            f"median {statistics.median(latencies) * 1e6:6.0f} us  "
            f"p99 {latencies[int(len(latencies) * 0.99)] * 1e6:6.0f} us  "
            f"cpu {cpu * 1e6:5.0f} us/call  |  {concurrency} in flight: "
            f"{rate:7.0f} calls/s, cpu {cpu_par * 1e6:5.0f} us/call"
        )
    finally:
        await close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--only", action="append", help="client names to run (substring)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {args.calls} calls each")
    with redis_server() as port:
        for name, (module, make) in CLIENTS.items():
            if args.only and not any(o in name for o in args.only):
                continue
            if importlib.util.find_spec(module) is None:
                print(f"{name:40s} not installed: skipped")
                continue
            result = asyncio.run(measure(make, port, args.calls, args.concurrency))
            print(f"{name:40s} {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
