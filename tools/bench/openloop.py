"""A small open-loop HTTP/1.1 load generator (asyncio), for latency at a fixed request rate.

wrk is closed-loop: a slow reply delays the next request, which hides queueing (coordinated
omission). Here request ``i`` is *due* at ``start + i / rate`` whatever happened before, and its
latency is measured from that due time, so time spent waiting for a free connection counts.
Connections are keep-alive and opened on demand (up to ``max_connections``): a request due
while every connection is busy takes a new one.

Its own cost is reported (:attr:`OpenLoopResult.client_cpu_share`: CPU seconds of this process
per wall second) so a run can show the generator was not the bottleneck; the benchmark also
runs it against nginx directly, which gives the generator's own latency floor.
"""

from __future__ import annotations

import asyncio
import resource
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["OpenLoopResult", "run_open_loop"]


@dataclass(frozen=True)
class OpenLoopResult:
    """Latency percentiles (ms, from each request's due time) at an offered ``rate``."""

    rate: float
    sent: int
    ok: int
    errors: int
    achieved_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    connections: int
    client_cpu_share: float

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> int:
        """Send one request, read one response; return its status."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def _run(  # noqa: PLR0917 - private; one call site passes everything
    host: str,
    port: int,
    request: bytes,
    rate: float,
    seconds: float,
    max_connections: int,
    timeout: float,  # noqa: ASYNC109 - per request, not for the whole call
) -> OpenLoopResult:
    idle: list[_Connection] = []
    opened = 0
    latencies: list[float] = []
    failed = 0  # no response (connection error, timeout)
    bad_status = 0  # a response >= 400
    pending: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(max_connections)

    async def one(due: float) -> None:
        nonlocal opened, failed, bad_status
        async with slots:
            conn = idle.pop() if idle else None
            try:
                if conn is None:
                    reader, writer = await asyncio.open_connection(host, port)
                    conn = _Connection(reader, writer)
                    opened += 1
                status = await asyncio.wait_for(conn.exchange(request), timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                failed += 1
                if conn is not None:
                    conn.close()
                return
            latencies.append(time.perf_counter() - due)
            if status >= 400:
                bad_status += 1
            idle.append(conn)

    loop = asyncio.get_running_loop()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter() + 0.05
    total = max(1, round(rate * seconds))
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(set(pending), timeout=timeout + 5)
    wall = time.perf_counter() - start
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    for conn in idle:
        conn.close()
    for task in pending:
        task.cancel()
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    values = sorted(latencies)
    unfinished = total - len(values) - failed
    return OpenLoopResult(
        rate=rate,
        sent=total,
        ok=len(values) - bad_status,
        errors=failed + bad_status + unfinished,
        achieved_rps=len(values) / wall if wall > 0 else 0.0,
        p50_ms=_percentile(values, 50) * 1000,
        p95_ms=_percentile(values, 95) * 1000,
        p99_ms=_percentile(values, 99) * 1000,
        max_ms=(values[-1] if values else float("nan")) * 1000,
        connections=opened,
        client_cpu_share=cpu / wall if wall > 0 else 0.0,
    )


def build_request(
    path: str,
    *,
    host: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    """An HTTP/1.1 keep-alive request, encoded once."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def run_open_loop(
    host: str,
    port: int,
    request: bytes,
    *,
    rate: float,
    seconds: float,
    max_connections: int = 256,
    timeout: float = 10.0,
) -> OpenLoopResult:
    """Offer ``rate`` requests/s for ``seconds`` (own event loop, uvloop when installed: its
    lower per-request overhead keeps the generator's own latency small; call from sync code)."""
    coro = _run(host, port, request, rate, seconds, max_connections, timeout)
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
