"""Prometheus metrics: what the engine does, on a separate ``--metrics-listen`` port.

Off by default: until :func:`enable` runs, every recording function is a no-op that
costs one attribute check, so tests and embedders pay nothing.

Multi-process correct: :func:`enable` (called by ``engine.main`` in the parent, BEFORE
the workers fork) creates a private directory, points ``PROMETHEUS_MULTIPROC_DIR`` at it
and switches prometheus-client to its multiprocess values, so each worker writes its
own memory-mapped file there; the ``/metrics`` endpoint (served by the parent, or the
single worker) sums them with ``MultiProcessCollector``. Counters and histograms are
the sum over workers; gauges say how they combine (``max``, or ``liveall`` per pid).

Label cardinality is bounded by configuration, never by time or traffic: ``route`` is a
route key of the configuration or the single value ``(unknown)`` (see
:func:`route_label`); policy labels are the configured name and version; other labels
come from small fixed sets (``reason``, ``kind``, ``status``, ``result``, ``decision``,
``source`` = the publisher, ``file`` or ``xds``). What changes with every push (a
version, a content hash) is a *value*, never a label: each label value is a series
Prometheus keeps, and multiprocess files cannot forget one. Per-process gauges
(``liveall``: a ``pid`` label) leave the exposition when their worker dies: the
supervisor calls :func:`process_dead` as it reaps it. A dead worker's counter and
histogram files stay: their counts belong to the totals (no ``pid`` label, so no
series of their own).

Metric names (all prefixed ``policy_engine_``):

=================================================  =========================================
``streams_total{route}``                           ext_proc streams (one per HTTP request)
``requests_total{route}``                          requests that ran a policy chain
``policy_duration_seconds{route,name,version}``    histogram of each policy hook run; its
                                                   ``_count`` is the number of runs
``policy_skips_total{route,name,version,reason}``  ``condition`` (the condition was false)
``policy_short_circuits_total{...,status}``        immediate responses, by HTTP status
``policy_failures_total{...,kind}``                ``timeout``, ``exception``, ``bad_result``,
                                                   ``cancelled``, ``condition_error``
``shadow_decisions_total{...,decision}``           what ``mode: shadow`` entries would have
                                                   done: ``allow``, ``would_reject``,
                                                   ``would_modify``, ``failed`` (engine/shadow.py)
``extproc_protocol_errors_total``                  malformed or out-of-order messages
``config_version``                                 version of the serving configuration (max)
``config_info{source}``                            1 for the publisher of the serving
                                                   configuration (``file``/``xds``; per pid)
``config_hash``                                    its sha256, first 12 hex digits as a
                                                   number (exact in a double; per pid)
``config_reloads_total{result}``                   ``ok`` / ``rejected`` / ``failed``
``config_last_reload_timestamp_seconds{result}``   when (Unix time)
``xds_connected``, ``xds_responses_total{result}``  xDS stream state, ``ACK`` / ``NACK``
``xds_last_response_timestamp_seconds{result}``    when the last ACK / NACK was sent
``ratelimit_decisions_total{backend,decision}``    rateLimit v2 decisions
``ratelimit_backend_errors_total{backend}``        Redis failures (each failed call)
=================================================  =========================================
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from engine.tls import ServerTls

__all__ = [
    "FAILURE_KINDS",
    "UNKNOWN_ROUTE",
    "Metrics",
    "config_published",
    "config_reload_failed",
    "disable",
    "enable",
    "enabled",
    "extproc_protocol_error",
    "get",
    "hash_value",
    "http_body_refusal",
    "policy_failed",
    "policy_ran",
    "policy_short_circuit",
    "policy_skipped",
    "process_dead",
    "ratelimit_backend_error",
    "ratelimit_decision",
    "render",
    "route_label",
    "serve",
    "shadow_decision",
    "stream",
    "xds_connected",
    "xds_response",
]

_log: Final = logging.getLogger("engine.metrics")
UNKNOWN_ROUTE: Final = "(unknown)"
PREFIX: Final = "policy_engine_"

# Latency buckets for policy hooks: from 50 us (header rewrites) to 5 s (a JWKS fetch).
_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class Metrics:
    """The engine's metric families (created by :func:`enable`)."""

    def __init__(self) -> None:
        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(PREFIX + name, doc, list(labels), registry=None)

        def gauge(
            name: str,
            doc: str,
            labels: Iterable[str] = (),
            mode: Literal["max", "liveall"] = "max",
        ) -> Gauge:
            return Gauge(PREFIX + name, doc, list(labels), registry=None, multiprocess_mode=mode)

        policy = ("route", "name", "version")
        self.streams = counter("streams", "ext_proc streams (one per HTTP request)", ["route"])
        self.requests = counter("requests", "requests that ran a policy chain", ["route"])
        self.policy_duration: Histogram = Histogram(
            PREFIX + "policy_duration_seconds",
            "policy hook run time (the _count is the number of runs)",
            list(policy),
            buckets=_BUCKETS,
            registry=None,
        )
        self.policy_skips = counter(
            "policy_skips", "policies skipped by their condition", [*policy, "reason"]
        )
        self.policy_short_circuits = counter(
            "policy_short_circuits",
            "immediate responses returned by a policy",
            [*policy, "status"],
        )
        self.policy_failures = counter(
            "policy_failures", "policy hook failures by kind", [*policy, "kind"]
        )
        self.shadow_decisions = counter(
            "shadow_decisions",
            "what shadow-mode entries would have done (nothing was enforced)",
            [*policy, "decision"],
        )
        self.protocol_errors = counter(
            "extproc_protocol_errors", "malformed or out-of-order ext_proc messages"
        )
        self.http_body_refusals = counter(
            "http_body_refusals",
            "requests answered 500 because their chain reads a body and they came over the "
            "HTTP ext_proc transport (which carries no bodies)",
            ["route"],
        )
        self.config_version = gauge("config_version", "version of the serving configuration")
        self.config_info = gauge(
            "config_info",
            "1 for the publisher (file or xds) of the serving configuration, 0 for one that "
            "published earlier (per process)",
            ["source"],
            mode="liveall",
        )
        self.config_hash = gauge(
            "config_hash",
            "sha256 of the serving configuration: its first 12 hex digits as a number "
            "(per process; equal values = same configuration)",
            mode="liveall",
        )
        self.config_reloads = counter(
            "config_reloads", "configuration reloads by result (counted per worker)", ["result"]
        )
        self.config_reload_time = gauge(
            "config_last_reload_timestamp_seconds", "time of the last reload", ["result"]
        )
        self.xds_connected = gauge("xds_connected", "1 while the xDS stream is up", mode="liveall")
        self.xds_responses = counter(
            "xds_responses", "xDS responses answered, by ACK / NACK", ["result"]
        )
        self.xds_response_time = gauge(
            "xds_last_response_timestamp_seconds", "time of the last ACK / NACK", ["result"]
        )
        self.ratelimit_decisions = counter(
            "ratelimit_decisions", "rate-limit decisions", ["backend", "decision"]
        )
        self.ratelimit_backend_errors = counter(
            "ratelimit_backend_errors", "failed rate-limit backend calls", ["backend"]
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._known_routes: frozenset[str] = frozenset()
        self._info_source: str | None = None

    def child(self, family: Any, *labels: str) -> Any:
        """``family.labels(*labels)``, cached: the hot path avoids label validation."""
        key = (id(family), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*labels)
        return found


_state: dict[str, Any] = {"metrics": None, "dir": None}


def enabled() -> bool:
    return _state["metrics"] is not None


def get() -> Metrics | None:
    """The metric families, or ``None`` when metrics are off."""
    metrics: Metrics | None = _state["metrics"]
    return metrics


def enable(directory: str | None = None) -> Metrics:
    """Turn metrics on for this process and the workers it will fork.

    Must run before fork and before any metric is recorded. ``directory`` (default: a
    new private temporary directory, removed by :func:`disable`) receives one file per
    process.
    """
    if _state["metrics"] is not None:
        return _state["metrics"]  # type: ignore[no-any-return]
    path = directory or tempfile.mkdtemp(prefix="policy-engine-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    # prometheus-client picks its value class when it is imported, before we know
    # whether metrics are wanted: switch it now, before any metric exists.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _state["dir"] = path if directory is None else None
    metrics = _state["metrics"] = Metrics()
    for result in ("ok", "rejected", "failed"):  # start at 0: see config_published
        metrics.config_reloads.labels(result)
    for verdict in ("ACK", "NACK"):
        metrics.xds_responses.labels(verdict)
    metrics.protocol_errors.inc(0)
    return metrics


def disable() -> None:
    """Turn metrics off and remove the directory :func:`enable` created (tests, exit)."""
    if _state["metrics"] is None:
        return
    _state["metrics"] = None
    values.ValueClass = values.MutexValue
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    created = _state.pop("dir", None)
    _state["dir"] = None
    if created:
        shutil.rmtree(created, ignore_errors=True)


def render() -> bytes:
    """The Prometheus text exposition of every process's metrics."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


_HANDSHAKE_TIMEOUT: Final = 10.0  # seconds a scraper may take for TLS + its request


def serve(
    listen: str,
    *,
    reuse_port: bool = False,
    tls: ServerTls | None = None,
    exposition: Callable[[], bytes] | None = None,
) -> Callable[[], None]:
    """Serve ``GET /metrics`` on ``listen`` (``host:port``) from a daemon thread (it
    never touches the event loop); returns a function that stops it. Raises OSError when
    the address cannot be bound.

    ``tls``: HTTPS with its files (client certificates required when it has a client CA);
    each accepted connection is wrapped with the context of the files as they are then, so
    a rotation applies from the next connection. The handshake runs in the connection's
    thread with a timeout; a failed one is dropped (logged at debug level).

    With ``reuse_port`` every worker binds the same port (``SO_REUSEPORT``, like the gRPC
    port): whichever worker a scrape reaches renders every process's files, so each
    answer is the whole engine's sum, and no thread runs in the forking parent.

    ``exposition``: what a scrape returns (default :func:`render`, the engine's metrics;
    the control plane serves its own registry through the same server).
    """
    body_of = exposition if exposition is not None else render

    class Handler(BaseHTTPRequestHandler):
        timeout = _HANDSHAKE_TIMEOUT if tls is not None else None

        def setup(self) -> None:
            super().setup()
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()

        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = body_of()
            self.send_response(200)
            self.send_header("content-type", CONTENT_TYPE_LATEST)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        allow_reuse_port = reuse_port
        daemon_threads = True

        def get_request(self) -> tuple[socket.socket, Any]:
            connection, address = super().get_request()
            if tls is None:
                return connection, address
            try:
                context = tls.ssl_context()
            except Exception:
                connection.close()
                raise OSError("metrics: no TLS context") from None
            wrapped = context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
            return wrapped, address

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A client without a valid certificate, a scanner, a dropped connection.
            _log.debug("metrics: connection from %s failed", client_address, exc_info=True)

    host, _, port = listen.rpartition(":")
    server = Server((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    stop.port = server.server_address[1]  # type: ignore[attr-defined]
    return stop


# -- recording (each a no-op while metrics are off) -------------------------------------


def route_label(route: str) -> str:
    """``route`` if the serving configuration has it, else :data:`UNKNOWN_ROUTE`."""
    metrics = get()
    if metrics is None or route in metrics._known_routes:
        return route
    return UNKNOWN_ROUTE


def stream(route: str, *, has_chain: bool) -> None:
    """One ext_proc stream (HTTP request) for ``route``; ``has_chain``: a chain ran."""
    metrics = get()
    if metrics is None:
        return
    label = route if route in metrics._known_routes else UNKNOWN_ROUTE
    metrics.child(metrics.streams, label).inc()
    if has_chain:
        metrics.child(metrics.requests, label).inc()


def policy_ran(route: str, name: str, version: str, seconds: float) -> None:
    """A policy hook ran for ``seconds`` (whatever its result)."""
    metrics = get()
    if metrics is not None:
        metrics.child(metrics.policy_duration, route, name, version).observe(seconds)


def policy_skipped(route: str, name: str, version: str, reason: str) -> None:
    """``reason``: ``condition`` (it was false; a condition that fails to evaluate is a
    failure of kind ``condition_error``)."""
    metrics = get()
    if metrics is not None:
        metrics.child(metrics.policy_skips, route, name, version, reason).inc()


def policy_short_circuit(route: str, name: str, version: str, status: int) -> None:
    metrics = get()
    if metrics is not None:
        metrics.child(metrics.policy_short_circuits, route, name, version, str(status)).inc()


def policy_failed(route: str, name: str, version: str, kind: str) -> None:
    """``kind``: ``timeout``, ``exception``, ``bad_result``, ``cancelled`` or
    ``condition_error``."""
    metrics = get()
    if metrics is not None:
        metrics.child(metrics.policy_failures, route, name, version, kind).inc()


def shadow_decision(route: str, name: str, version: str, decision: str) -> None:
    """``decision``: ``allow``, ``would_reject``, ``would_modify`` or ``failed`` (a shadow
    entry's, never enforced; see engine/shadow.py)."""
    metrics = get()
    if metrics is not None:
        metrics.child(metrics.shadow_decisions, route, name, version, decision).inc()


def extproc_protocol_error() -> None:
    metrics = get()
    if metrics is not None:
        metrics.protocol_errors.inc()


def http_body_refusal(route: str) -> None:
    metrics = get()
    if metrics is not None:
        metrics.child(metrics.http_body_refusals, route_label(route)).inc()


def hash_value(content_hash: str) -> int:
    """The first 12 hex digits of ``content_hash`` as an integer (48 bits: a double holds
    it exactly, so dashboards can compare engines); 0 if it is not hex."""
    try:
        return int(content_hash[:12], 16)
    except ValueError:
        return 0


FAILURE_KINDS: Final = ("exception", "timeout", "bad_result", "cancelled", "condition_error")
"""Every ``kind`` of ``policy_failures_total``."""


def config_published(
    version: int,
    source: str,
    content_hash: str,
    routes: Iterable[str],
    policies: Iterable[tuple[str, str, str]] = (),
) -> None:
    """A configuration is now serving (initial load, file reload or xDS).

    ``source`` names the publisher (``file``, ``xds``): a label, so it must come from a
    fixed set, never a path, a version or anything a push changes. ``policies``: its
    ``(route, name, version)`` entries. The series whose labels are now known start at 0
    (streams and requests per route, each policy's runs and failures by kind), so
    ``rate()`` and ``increase()`` over them return 0, not nothing, before the first event.
    """
    metrics = get()
    if metrics is None:
        return
    metrics._known_routes = frozenset(routes)
    for route in (*metrics._known_routes, UNKNOWN_ROUTE):
        metrics.child(metrics.streams, route)
        metrics.child(metrics.requests, route)
    for route, name, policy_version in policies:
        metrics.child(metrics.policy_duration, route, name, policy_version)
        for kind in FAILURE_KINDS:
            metrics.child(metrics.policy_failures, route, name, policy_version, kind)
    metrics.config_version.set(version)
    metrics.config_hash.set(hash_value(content_hash))
    # Multiprocess mode cannot remove a series: a previous publisher's drops to 0 (at
    # most one per publisher kind), and the serving one is the series whose value is 1.
    if metrics._info_source is not None and metrics._info_source != source:
        metrics.config_info.labels(metrics._info_source).set(0)
    metrics._info_source = source
    metrics.config_info.labels(source).set(1)
    metrics.config_reloads.labels("ok").inc()
    metrics.config_reload_time.labels("ok").set(time.time())


def process_dead(pid: int) -> None:
    """Worker ``pid`` has exited (called by the supervisor as it reaps it): remove its
    per-process gauge files, so its ``pid`` series leave /metrics instead of piling up
    with every restart. Counter and histogram files stay (their counts are the totals')."""
    if get() is None:
        return
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def config_reload_failed(result: str) -> None:
    """A reload was refused: ``rejected`` (invalid config) or ``failed`` (loader error)."""
    metrics = get()
    if metrics is None:
        return
    metrics.config_reloads.labels(result).inc()
    metrics.config_reload_time.labels(result).set(time.time())


def xds_connected(connected: bool) -> None:
    metrics = get()
    if metrics is not None:
        metrics.xds_connected.set(1 if connected else 0)


def xds_response(result: str) -> None:
    """The client answered a response with ``ACK`` or ``NACK``."""
    metrics = get()
    if metrics is not None:
        metrics.xds_responses.labels(result).inc()
        metrics.xds_response_time.labels(result).set(time.time())


def ratelimit_decision(backend: str, decision: str) -> None:
    metrics = get()
    if metrics is not None:
        metrics.child(metrics.ratelimit_decisions, backend, decision).inc()


def ratelimit_backend_error(backend: str) -> None:
    metrics = get()
    if metrics is not None:
        metrics.child(metrics.ratelimit_backend_errors, backend).inc()
