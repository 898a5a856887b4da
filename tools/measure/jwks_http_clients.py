"""Measure async HTTP clients for the JWKS fetch of jwtValidation (issue 8 item 7).

Fetches a JWKS (3 keys, ~2.5 KB) from the real HTTPS test server of
``policies/jwtValidation/testing.py`` (throw-away CA, 127.0.0.1) with httpx and
aiohttp, and prints, per client: median wall time per fetch and CPU time per fetch
with one client kept (connection reuse) and with a new client per fetch, the
connections the server saw, and the cold import cost. Run from the repository root
with both clients installed (they are not both in the lock):

    python tools/measure/jwks_http_clients.py [fetches]

The figures go into the commit message and docs/ (decisions, benchmarks); there are no assertions.
"""

from __future__ import annotations

import asyncio
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

from policies.jwtValidation.testing import JwksServer, KeySet, make_pki

__all__: list[str] = []

Fetch = Callable[[], Awaitable[bytes]]


async def _measure(name: str, fetch: Fetch, count: int) -> tuple[float, float]:
    for _ in range(5):  # warm-up (TLS session, pools)
        await fetch()
    walls: list[float] = []
    cpu_start = time.process_time()
    for _ in range(count):
        start = time.perf_counter()
        body = await fetch()
        walls.append(time.perf_counter() - start)
        assert body.startswith(b'{"keys"'), name
    cpu = (time.process_time() - cpu_start) / count
    return statistics.median(walls) * 1e3, cpu * 1e3


async def run(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp))
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        keys = KeySet.generate()
        with JwksServer(pki, keys.published) as server:
            url = server.url

            async with httpx.AsyncClient(verify=context, timeout=5.0) as client:

                async def httpx_reuse() -> bytes:
                    return bytes((await client.get(url)).content)

                before = server.connections
                wall, cpu = await _measure("httpx", httpx_reuse, count)
                print(
                    f"httpx {httpx.__version__} reuse: {wall:.2f} ms/fetch, CPU {cpu:.2f} ms, "
                    f"connections {server.connections - before}"
                )

            async def httpx_fresh() -> bytes:
                async with httpx.AsyncClient(verify=context, timeout=5.0) as fresh:
                    return bytes((await fresh.get(url)).content)

            before = server.connections
            wall, cpu = await _measure("httpx", httpx_fresh, count)
            print(
                f"httpx new client per fetch: {wall:.2f} ms/fetch, CPU {cpu:.2f} ms, "
                f"connections {server.connections - before}"
            )

            timeout = aiohttp.ClientTimeout(total=5.0)
            connector = aiohttp.TCPConnector(ssl=context)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

                async def aiohttp_reuse() -> bytes:
                    async with session.get(url) as response:
                        return await response.read()

                before = server.connections
                wall, cpu = await _measure("aiohttp", aiohttp_reuse, count)
                print(
                    f"aiohttp {aiohttp.__version__} reuse: {wall:.2f} ms/fetch, CPU {cpu:.2f} ms, "
                    f"connections {server.connections - before}"
                )

            async def aiohttp_fresh() -> bytes:
                fresh_connector = aiohttp.TCPConnector(ssl=context)
                async with (
                    aiohttp.ClientSession(connector=fresh_connector, timeout=timeout) as fresh,
                    fresh.get(url) as response,
                ):
                    return await response.read()

            before = server.connections
            wall, cpu = await _measure("aiohttp", aiohttp_fresh, count)
            print(
                f"aiohttp new session per fetch: {wall:.2f} ms/fetch, CPU {cpu:.2f} ms, "
                f"connections {server.connections - before}"
            )


def import_cost(module: str, repeats: int = 5) -> float:
    """Median wall ms of ``python -c 'import module'`` minus ``python -c pass``."""

    def median_run(code: str) -> float:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    return (median_run(f"import {module}") - median_run("pass")) * 1e3


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    asyncio.run(run(count))
    for module in ("httpx", "aiohttp"):
        print(f"import {module}: {import_cost(module):.0f} ms")


if __name__ == "__main__":
    main()
