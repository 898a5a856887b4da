"""The engine's servers: gRPC ext_proc + health, the HTTP transport beside, drain, workers.

Shape of the grpc aio examples: :func:`serve` builds the server, starts it, waits for a stop
request (SIGTERM/SIGINT or the ``stop`` event) and stops it with a grace period in ``finally``
so in-flight streams drain.

Health (``grpc.health.v1.Health``; services ``""`` and
``envoy.service.ext_proc.v3.ExternalProcessor``) reports SERVING once the store holds a
configuration (from the first publish if :func:`serve` starts with an empty store) and
NOT_SERVING from the moment shutdown starts. Shutdown then keeps serving for the drain
period (``--drain``) so Envoy's health checker sees NOT_SERVING and moves new streams away
while they still succeed, then waits, within the grace period (``--grace``), for the
streams still in flight, and only then stops the server (GOAWAY, connections closed): gRPC
closes a connection at once when its last stream ends after the GOAWAY, which can cost the
peer that stream's status (see :func:`_quiesce`).

Workers
    :func:`serve_workers` forks N processes that each run their own grpc.aio server on the same
    port with ``SO_REUSEPORT`` (the kernel spreads connections across them). It forks BEFORE
    any gRPC object exists in the parent (gRPC core is not fork-safe once initialised) and
    children inherit the already loaded registry and configuration, so a builder-generated
    binary needs no importable registry module. The parent only supervises: it forwards
    SIGTERM/SIGINT to the workers, and a worker that dies on its own is forked again in its
    place (the parent still holds the loaded registry and configuration), at most
    :data:`MAX_RESTARTS_PER_MINUTE` times in any minute; after that it stops every worker and
    exits non-zero (a crash loop is for the process manager to handle).
    With one worker everything runs in-process and ``SO_REUSEPORT`` is OFF, so a port clash
    is an error rather than a silent second listener (gRPC enables it by default on Linux).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final, TypeVar

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from engine import metrics
from engine.chain import Snapshot
from engine.store import EMPTY_SNAPSHOT, ConfigSource, ConfigStore
from engine.tls import ServerTls
from engine.transport.grpc_service import DEFAULT_MAX_BODY_BYTES, PolicyProcessor
from engine.transport.http_server import HttpServer, start_http_server
from engine.transport.http_service import HttpExtProc

__all__ = [
    "EXT_PROC_SERVICE",
    "MAX_RESTARTS_PER_MINUTE",
    "grpc_options",
    "run_loop",
    "serve",
    "serve_workers",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

EXT_PROC_SERVICE: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
_HEALTH_SERVICES: Final = ("", EXT_PROC_SERVICE)
_WORKER_KILL_AFTER: Final = 5.0  # seconds past the grace period before SIGKILL
_RESTART_WINDOW: Final = 60.0
MAX_RESTARTS_PER_MINUTE: Final = 5
"""Worker restarts allowed in any minute before the supervisor gives up (exit 1)."""
_STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
_MESSAGE_HEADROOM: Final = 1024 * 1024  # headers, attributes, metadata around a body


async def serve(
    listen: str,
    store: ConfigStore,
    *,
    source: ConfigSource | None = None,
    grace: float = 5.0,
    drain: float = 0.0,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    on_bound: Callable[[int], None] | None = None,
    processor: PolicyProcessor | None = None,
    reuse_port: bool = False,
    handle_signals: bool | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    tls: ServerTls | None = None,
    health_listen: str | None = None,
    http_listen: str | None = None,
    on_http_bound: Callable[[int], None] | None = None,
) -> None:
    """Serve ext_proc + health on ``listen`` (``host:port``; port 0 picks a free one).

    ``tls``: serve TLS with its files (mTLS when it has a client CA: a client without a
    valid certificate fails the handshake and never reaches a servicer), re-read when they
    change, before the next handshake (:mod:`engine.tls`); ``None``: plaintext.
    ``health_listen``: also serve the health service alone, in plaintext, on this address
    (a second gRPC server sharing the health state): what an in-container probe reaches
    when ``listen`` demands a client certificate. Callers keep it on loopback.
    ``http_listen``: also serve Envoy's HTTP ext_proc transport (``http_service``) there,
    from the same processor (:mod:`engine.transport.http_service`,
    :mod:`engine.transport.http_server`; same ``tls`` and ``reuse_port``);
    ``on_http_bound(port)`` gets its bound port. It stops accepting when the grace period
    starts and its requests in flight finish within it.

    Returns after a graceful stop. ``on_bound(port)`` is called with the bound port, then
    ``ready`` is set, once the server accepts streams. The server stops when ``stop`` is set
    or, when ``handle_signals`` (default: only in the main thread) on SIGTERM/SIGINT. Then:
    health reports NOT_SERVING at once, the server keeps serving (new streams too) for
    ``drain`` seconds so Envoy's health checks see NOT_SERVING and move traffic away
    (a second stop request ends the drain early), then ``source`` stops. In-flight streams
    then get ``grace`` seconds in all: the server waits until none is in flight (still
    accepting), then stops accepting (GOAWAY) and closes its connections; streams still
    running when the grace period ends are cancelled. Raises ``RuntimeError`` if ``listen``
    cannot be bound.

    ``max_body_bytes`` (ignored when ``processor`` is given: its own limit counts) bounds the
    bodies policies see; the gRPC message limits are sized from it (:func:`grpc_options`).
    """
    stop = stop if stop is not None else asyncio.Event()
    if processor is None:
        processor = PolicyProcessor(store, max_body_bytes=max_body_bytes)
    server = grpc.aio.server(options=grpc_options(processor.max_body_bytes, reuse_port=reuse_port))
    pb_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if tls is not None:
        port = server.add_secure_port(listen, tls.grpc_credentials())
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen}")
    health_server = None
    if health_listen is not None:
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        if health_server.add_insecure_port(health_listen) == 0:
            raise RuntimeError(f"cannot listen on {health_listen}")

    loop = asyncio.get_running_loop()
    if handle_signals is None:
        handle_signals = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    tasks: list[asyncio.Task[None]] = []
    remove_listener: Callable[[], None] | None = None
    http_server: HttpServer | None = None
    requested = False  # a requested stop drains; a crash or cancellation does not
    try:
        for sig in signals:
            loop.add_signal_handler(sig, _request_stop, stop, sig)
        if store.current is not EMPTY_SNAPSHOT:
            await _set_health(health, serving=True)
        else:  # SERVING from the first publish on (the listener runs on this loop)
            await _set_health(health, serving=False)

            def on_first_publish(_: Snapshot) -> None:
                # Once is enough: staying registered would spawn (and keep) one task per reload.
                if remove_listener is not None:
                    remove_listener()
                _spawn(tasks, _set_health(health, serving=True))

            remove_listener = store.add_listener(on_first_publish)
        await server.start()
        if health_server is not None:
            await health_server.start()
        security = "plaintext" if tls is None else "mTLS" if tls.mutual else "TLS"
        if http_listen is not None:
            http_server = await start_http_server(
                http_listen, HttpExtProc(processor), reuse_port=reuse_port, tls=tls
            )
            log.info(
                "HTTP ext_proc transport listening on %s (port %d, %s)",
                http_listen,
                http_server.port,
                security,
            )
            if on_http_bound is not None:
                on_http_bound(http_server.port)
        if source is not None:
            tasks.append(asyncio.create_task(_run_source(source), name="config-source"))
        log.info(
            "policy engine listening on %s (port %d, %s, pid %d)",
            listen,
            port,
            security,
            os.getpid(),
        )
        if on_bound is not None:
            on_bound(port)
        if ready is not None:
            ready.set()
        await stop.wait()
        requested = True
    finally:
        if remove_listener is not None:
            remove_listener()
        await health.enter_graceful_shutdown()
        if requested and drain > 0:
            log.info("stopping: NOT_SERVING, still serving for the drain period (%.1fs)", drain)
            stop.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), drain)
        log.info("stopping: in-flight streams may finish (grace %.1fs)", grace)
        deadline = loop.time() + grace
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if http_server is not None:
            await http_server.close(max(0.0, deadline - loop.time()))
        await _quiesce(processor, deadline)
        await server.stop(max(0.0, deadline - loop.time()))
        if health_server is not None:
            await health_server.stop(None)
        for sig in signals:
            loop.remove_signal_handler(sig)
        log.info("stopped")


_PENDING_CALLS_LIMIT: Final = 1_000_000


def run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` to completion on uvloop's event loop (a new loop, closed afterwards).

    uvloop is the engine's loop because it costs less per ext_proc stream: trivial grpc.aio
    servicers through the same Envoy, interleaved runs, median CPU per request 494 us with
    uvloop vs 621 us without (tools/bench; README, decisions). grpc.aio runs on any asyncio
    loop (its completion queue is polled from its own thread)."""
    return uvloop.run(main)


def grpc_options(max_body_bytes: int, *, reuse_port: bool) -> list[tuple[str, int]]:
    """gRPC server options. The message limits (gRPC's default receive limit is 4 MiB) are
    twice the body limit plus 1 MiB for headers and attributes: a body just over the limit
    still reaches the engine, which answers 413 itself, instead of gRPC failing the stream
    with RESOURCE_EXHAUSTED (Envoy with ``failure_mode_allow`` would then pass the request
    unpoliced). Replies carry at most one body, bounded the same way."""
    message_limit = 2 * max_body_bytes + _MESSAGE_HEADROOM
    return [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", message_limit),
        ("grpc.max_send_message_length", message_limit),
        # grpc.aio picks up one new call at a time, so while the event loop is busy every
        # stream Envoy opens waits inside grpc-core, whose backlog protection cancels the
        # waiting calls past 1,000 (at random) and 3,000 (all): Envoy answers those 500
        # (issue 10: 20 of 3,497 at 2,000 connections, 6,086 at 10,000). Load shedding is
        # Envoy's message_timeout's job, so the limits are out of the way.
        ("grpc.server.max_pending_requests", _PENDING_CALLS_LIMIT),
        ("grpc.server.max_pending_requests_hard_limit", _PENDING_CALLS_LIMIT),
    ]


async def _quiesce(processor: PolicyProcessor, deadline: float) -> None:
    """Wait (at most until ``deadline``, loop time) until no ext_proc stream is in flight, still
    accepting new ones, so that ``server.stop`` sends its GOAWAY on idle connections.

    Why not leave the in-flight streams to ``server.stop(grace)``: after its GOAWAY, gRPC core
    closes a connection the moment the connection's last stream has written its final status,
    without a lingering close. Frames the peer sent meanwhile (its half-close, a BDP ping, a
    WINDOW_UPDATE) are then unread, so the kernel answers with a TCP reset, and a peer that
    handles its failed write before parsing what it has received loses the OK status already
    in its receive buffer: the stream ends UNAVAILABLE (gRPC's own client, seen in its
    transport trace; RFC 9112 section 9.6 describes the same hazard for HTTP/1.1). Envoy
    answers a non-OK ext_proc status like a failed engine (``status_on_error`` unless
    ``failure_mode_allow``). On an idle connection gRPC core's graceful GOAWAY waits for a
    PING round trip before it closes, and a PING is acknowledged only after every frame
    sent before it was processed: every status has been read.

    A stream that starts after the wait and before the GOAWAY still races; with a drain
    period (health NOT_SERVING first) no new streams come. When ``deadline`` passes with
    streams in flight (traffic never paused), the grace period is spent: ``server.stop``
    cancels them.
    """
    in_flight = processor.streams_in_flight
    if not in_flight:
        return
    log.info("stopping: waiting for %d in-flight streams before closing connections", in_flight)
    try:
        async with asyncio.timeout_at(deadline):
            await processor.wait_idle()
    except TimeoutError:
        log.warning(
            "stopping: %d streams still in flight after the grace period",
            processor.streams_in_flight,
        )


def _request_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("received %s", sig.name)
    stop.set()


def _spawn(tasks: list[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
    tasks.append(asyncio.get_running_loop().create_task(coro))


async def _set_health(health: health_aio.HealthServicer, *, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in _HEALTH_SERVICES:
        await health.set(service, status)


async def _run_source(source: ConfigSource) -> None:
    try:
        await source.run()
    except asyncio.CancelledError:
        raise
    except Exception:
        # Serving continues on the last good snapshot; reloads stop until restart.
        log.exception("configuration source failed; keeping the last good configuration")


def serve_workers(
    workers: int,
    run_worker: Callable[[], Coroutine[Any, Any, Any]],
    *,
    grace: float,
    drain: float = 0.0,
    max_restarts: int = MAX_RESTARTS_PER_MINUTE,
) -> int:
    """Fork ``workers`` processes that each run ``run_loop(run_worker())``; supervise them.

    ``run_worker`` must create its gRPC server with ``reuse_port=True``. A worker that exits
    on its own (crash, OOM kill) is restarted in its place, at most ``max_restarts`` times in
    any minute; one more exit within that minute stops every worker and returns 1 (a crash
    loop is for the process manager to see). Returns the exit code for the parent: 0 after a
    requested stop where every worker exited cleanly, else 1. Must be called before the
    calling process creates any gRPC object (the supervisor forks replacements itself).
    """
    pids: dict[int, int] = {}  # pid -> worker index
    # A stop signal that arrives while we fork must not kill the parent before it can
    # forward the signal (the workers would be orphaned): hold SIGTERM/SIGINT until
    # supervision has its handlers, then deliver them there.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        for index in range(workers):
            pids[_fork_worker(index, run_worker, mask)] = index
    except BaseException:
        # A fork failed before supervision began: the workers already started would
        # outlive us, still serving the port. Stop and reap them first.
        _signal_all(set(pids), signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    log.info("started %d workers: %s", workers, sorted(pids))
    supervisor = _Supervisor(pids, run_worker, mask, max_restarts=max_restarts)
    return supervisor.run(grace=drain + grace)


def _fork_worker(
    index: int, run_worker: Callable[[], Coroutine[Any, Any, Any]], mask: Iterable[int]
) -> int:
    """Fork worker ``index``; the child runs ``run_worker`` and never returns. Call with the
    stop signals blocked: the child installs its own handlers before unblocking (``mask``)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            run_loop(run_worker())
            code = 0
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


class _Supervisor:
    """Waits for the workers; forwards SIGTERM/SIGINT to them; restarts one that dies on
    its own (bounded). ``mask`` is the signal mask to restore once the forwarding handlers
    are in place (pending signals arrive then)."""

    def __init__(
        self,
        pids: dict[int, int],
        run_worker: Callable[[], Coroutine[Any, Any, Any]],
        mask: Iterable[int],
        *,
        max_restarts: int,
    ) -> None:
        self.alive = dict(pids)
        self.run_worker = run_worker
        self.mask = mask
        self.max_restarts = max_restarts
        self.restarts: collections.deque[float] = collections.deque()
        self.requested = False
        self.failed = False

    def _forward(self, sig: int, _frame: object) -> None:
        self.requested = True
        _signal_all(set(self.alive), signal.SIGTERM)

    def run(self, *, grace: float) -> int:
        deadline: float | None = None
        previous = {s: signal.signal(s, self._forward) for s in _STOP_SIGNALS}
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        try:
            while self.alive:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    if (self.requested or self.failed) and deadline is None:
                        deadline = time.monotonic() + grace + _WORKER_KILL_AFTER
                    if deadline is not None and time.monotonic() > deadline:
                        log.error("workers %s did not stop in time: killing", sorted(self.alive))
                        _signal_all(set(self.alive), signal.SIGKILL)
                        self.failed = True
                        deadline = float("inf")
                    time.sleep(0.05)
                    continue
                if pid in self.alive:
                    self._exited(pid, os.waitstatus_to_exitcode(status))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if self.failed else 0

    def _exited(self, pid: int, code: int) -> None:
        index = self.alive.pop(pid)
        metrics.process_dead(pid)  # its per-process series leave /metrics (bounded labels)
        if self.requested or self.failed:
            # SIGTERM before a (re)started worker installed its handlers kills it outright:
            # still a clean stop.
            self.failed = self.failed or code not in (0, -signal.SIGTERM)
            return
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > _RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            log.error(
                "worker %d (pid %d) exited (%d) unexpectedly after %d restarts in the last "
                "minute: stopping all workers",
                index,
                pid,
                code,
                len(self.restarts),
            )
            self._stop_all()
            return
        self.restarts.append(now)
        log.error(
            "worker %d (pid %d) exited (%d) unexpectedly: restarting it (%d of at most %d "
            "restarts per minute)",
            index,
            pid,
            code,
            len(self.restarts),
            self.max_restarts,
        )
        # Block the stop signals while forking: the child must not run our forwarding
        # handler, and a stop requested meanwhile must reach the new worker too.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self.alive[_fork_worker(index, self.run_worker, self.mask)] = index
        except OSError:
            log.exception("cannot restart worker %d: stopping all workers", index)
            self._stop_all()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _stop_all(self) -> None:
        self.failed = True
        _signal_all(set(self.alive), signal.SIGTERM)


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
