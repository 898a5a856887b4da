"""The admin HTTP API of the control plane, on aiohttp's server.

=========================  ==========================================================
``GET /healthz``           ``{"status": "ok", "version": ...}`` (no token needed)
``GET /routes``            the table: ``{"version", "generation", "source", "routes"}``
``PUT /routes``            replace the whole table: body ``{"routes": {...}}``
``GET /routes/<key>``      one route's spec (404 if none)
``PUT /routes/<key>``      submit or replace one route: body ``{"policies": [...]}``
``DELETE /routes/<key>``   remove one route (404 if none)
``GET /status``            the table version and, per engine stream, what it ACKed/NACKed
``POST /explain``          what a route's chain would do for a described request
                           (controlplane/explain.py; read-only tokens may call it)
=========================  ==========================================================

Bodies are JSON or YAML (the config file's format; JSON is YAML). A change is accepted
only if the whole resulting table is valid: then ``200 {"version": ...}`` and every
engine gets it. Otherwise ``400 {"errors": [...]}`` with every problem, each naming
route, policy and field, and nothing changes or is pushed. (Run as ``<engine>
controlplane``, "valid" includes the constructors of the policies that declare
``pure_constructor``: :func:`controlplane.definitions.checking_registry`.)

``?wait=SECONDS`` on ``PUT``/``DELETE`` (at most :data:`MAX_WAIT`): once the change is
accepted, the answer waits until every engine stream open at that moment has ACKed or
NACKed the new version, or its stream ended, or the time is up
(:mod:`controlplane.rollout`), and adds ``"allAcked"`` and ``"engines"`` (per stream:
node, stream, peer, result ``ACK``/``NACK``/``superseded``/``disconnected``/``timeout``,
the version it answered, the NACK text). It is still **200** when an engine NACKed or
did not answer: the change *is* the table now (served to every engine, and to every
engine that connects later); ``allAcked`` says whether each engine runs it. A wrong
``wait`` is 400 naming the parameter, checked before anything changes. The connection's
lifetime (:attr:`AdminLimits.timeout`) is extended by the wait.

Parsing and validation run in worker threads (:meth:`~controlplane.table.RouteTable.change`):
a big submission does not stall the ADS streams served by the same event loop.

Every request, in this order:

1. ``Host`` must be in the allow list (:attr:`AdminLimits.allowed_hosts`), else **421**:
   a browser tricked by DNS rebinding sends the attacker's host name;
2. except ``GET /healthz``, ``Authorization: Bearer <token>`` must name a token of the
   token file (:mod:`controlplane.auth`), else **401**; ``read-only`` tokens may only
   ``GET`` and ``POST /explain`` (**403** otherwise); with ``--admin-no-auth`` every
   caller is ``anonymous`` with the read-write role;
3. a body over :attr:`AdminLimits.max_body` bytes (``POST /explain``:
   :data:`~controlplane.explain.MAX_EXPLAIN_BODY`) is **413** (checked on
   ``Content-Length`` before reading, and while reading).

Connections: at most :attr:`AdminLimits.max_connections` at once (more are answered 503
and closed), each closed :attr:`AdminLimits.timeout` seconds after it opened whatever it
is doing (a slow client, a trickled request head, an idle keep-alive).

Every accepted change is logged on the ``controlplane.audit`` logger: who (token name),
from where, what (method, path, route keys changed) and the old and new version. Token
values never appear in a response, a log line or an error.

TLS (:class:`CertReloader`): with a certificate and key the listener speaks HTTPS only;
the files are re-read when they change (cert-manager rotation) and new connections get
the new certificate, without a restart.

Route changes made here live in memory: the watched config (``--config``), the durable
GitOps source, replaces the whole table again when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from controlplane.ads import AdsServer
from controlplane.auth import Identity, Role, TokenFile
from controlplane.explain import MAX_EXPLAIN_BODY, TABLE_VERSION_HEADER, Explainer
from controlplane.rollout import wait_for_engines
from controlplane.table import Change, RouteTable
from engine.definition import YamlError, load_yaml
from engine.logformat import printable
from engine.settle import SettledFiles
from engine.tls import is_loopback

__all__ = [
    "MAX_WAIT",
    "AdminApi",
    "AdminLimits",
    "AdminServer",
    "CertReloader",
    "default_allowed_hosts",
]

log: Final = logging.getLogger("controlplane.admin")
audit: Final = logging.getLogger("controlplane.audit")

_ROUTES: Final = "/routes"
_EXPLAIN: Final = "/explain"
_ANONYMOUS: Final = Identity("anonymous", Role.READ_WRITE)
_WRITE_METHODS: Final = frozenset({"PUT", "DELETE", "POST", "PATCH"})
MAX_WAIT: Final = 60.0
"""The longest ``?wait=`` in seconds (a client wanting longer polls ``/status``)."""


def default_allowed_hosts(listen_host: str) -> frozenset[str]:
    """The ``Host`` values served by default: the listen address's host (unless it is a
    wildcard) and, for a loopback or wildcard bind, ``localhost``, ``127.0.0.1``, ``::1``."""
    host = listen_host.strip("[]").lower()
    hosts = {"localhost", "127.0.0.1", "::1"} if is_loopback(host) or _wildcard(host) else set()
    if host and not _wildcard(host):
        hosts.add(host)
    return frozenset(hosts)


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header, lower case, without port or brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header


def _shown(request: web.BaseRequest) -> str:
    """The request's path for a log line: its first 200 characters, control characters
    escaped (the path is decoded: ``%0A`` would otherwise start a forged line)."""
    return printable(request.path[:200])


@dataclass(frozen=True)
class AdminLimits:
    """The admin listener's policy (``--admin-*`` flags)."""

    allowed_hosts: frozenset[str]
    tokens: TokenFile | None  # None: --admin-no-auth
    max_body: int = 8 * 1024 * 1024
    max_connections: int = 32
    timeout: float = 30.0
    keepalive: float = 5.0
    max_head_line: int = 8190
    max_headers: int = 64


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    response = web.Response(
        status=status,
        body=(json.dumps(payload, indent=2, sort_keys=True) + "\n").encode(),
        content_type="application/json",
        headers={"cache-control": "no-store", **(headers or {})},
    )
    return response


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class AdminApi:
    """The request handler: Host check, authentication, limits, then the endpoints."""

    def __init__(self, table: RouteTable, ads: AdsServer, limits: AdminLimits) -> None:
        self.table = table
        self.ads = ads
        self.limits = limits
        self.explainer = Explainer(table)
        self.extend_deadline: Callable[[web.BaseRequest, float], None] = lambda _r, _s: None
        """Keeps the request's connection open ``seconds`` longer (set by the server)."""

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except _TooLarge as exc:
            return _json(413, {"errors": [f"body: over {exc.limit} bytes"]})
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # a handler bug answers 500, the server keeps going
            log.exception("%s %s failed", request.method, _shown(request))
            return _json(500, {"errors": ["internal error (see the log)"]})

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        host = _host_of(request.headers.get("Host", ""))
        if host not in self.limits.allowed_hosts:
            log.warning(
                "admin: refused Host %r from %s (%s %s)",
                host[:100],
                request.remote,
                request.method,
                _shown(request),
            )
            return _json(421, {"errors": ["Host not served here (see --admin-allowed-host)"]})
        path = request.path.rstrip("/") or "/"
        if path == "/healthz":
            return self._only(request, "GET") or _json(
                200, {"status": "ok", "version": self.table.current.version}
            )
        # POST /explain reads: it is not a change, whoever sends it.
        writes = request.method in _WRITE_METHODS and path != _EXPLAIN
        who = self._authenticate(request)
        if who is None:
            if writes:
                self.ads.metrics.admin_change("none", "unauthenticated")
            log.warning(
                "admin: 401 for %s %s from %s (missing or unknown token)",
                request.method,
                _shown(request),
                request.remote,
            )
            return _json(
                401,
                {"errors": ["authentication required: Authorization: Bearer <token>"]},
                {"www-authenticate": 'Bearer realm="controlplane-admin"'},
            )
        if writes and not who.may_write:
            self.ads.metrics.admin_change(who.role.value, "forbidden")
            log.warning(
                "admin: 403 for %s %s by %s (read-only)", request.method, _shown(request), who.name
            )
            return _json(403, {"errors": [f"token {who.name!r} is read-only"]})
        if path == "/status":
            return self._only(request, "GET") or self._status()
        if path == _EXPLAIN:
            return self._only(request, "POST") or await self._explain(request)
        if path == _ROUTES:
            return self._only(request, "GET", "PUT") or await self._table(request, who)
        if path.startswith(_ROUTES + "/"):
            key = path[len(_ROUTES) + 1 :]
            return self._only(request, "GET", "PUT", "DELETE") or await self._route(
                request, key, who
            )
        return _json(404, {"errors": [f"no such endpoint: {request.path}"]})

    def _authenticate(self, request: web.BaseRequest) -> Identity | None:
        if self.limits.tokens is None:
            return _ANONYMOUS
        return self.limits.tokens.authenticate(request.headers.get("Authorization"))

    @staticmethod
    def _only(request: web.BaseRequest, *methods: str) -> web.Response | None:
        if request.method in methods:
            return None
        return _json(
            405,
            {"errors": [f"{request.method} not allowed; use {', '.join(methods)}"]},
            {"allow": ", ".join(methods)},
        )

    def _status(self) -> web.Response:
        current = self.table.current
        return _json(
            200,
            {
                "version": current.version,
                "generation": current.generation,
                "engines": self.ads.status(),
            },
        )

    async def _table(self, request: web.BaseRequest, who: Identity) -> web.Response:
        if request.method == "GET":
            current = self.table.current
            return _json(
                200,
                {
                    "version": current.version,
                    "generation": current.generation,
                    "source": current.source,
                    "routes": self.table.routes(),
                },
            )
        wait, problem = _wait_of(request)
        if problem:
            return problem
        body, problem = await self._parse(request)
        if problem:
            return problem
        change = await self.table.replace(body, f"admin {request.method} {request.path}")
        return await self._verdict(request, who, change, wait)

    async def _route(self, request: web.BaseRequest, key: str, who: Identity) -> web.Response:
        if not key or "/" in key:
            return _json(404, {"errors": [f"no such endpoint: {request.path}"]})
        source = f"admin {request.method} {request.path}"
        wait, problem = _wait_of(request)
        if problem:
            return problem
        if request.method == "GET":
            routes = self.table.routes()
            if key not in routes:
                return _json(404, {"errors": [f"routes[{key}]: no such route"]})
            return _json(
                200, {"version": self.table.current.version, "route": key, "spec": routes[key]}
            )
        if request.method == "DELETE":
            deleted = await self.table.delete_route(key, source)
            if deleted is None:
                return _json(404, {"errors": [f"routes[{key}]: no such route"]})
            return await self._verdict(request, who, deleted, wait)
        spec, problem = await self._parse(request)
        if problem:
            return problem
        change = await self.table.put_route(key, spec, source)
        return await self._verdict(request, who, change, wait)

    async def _verdict(
        self, request: web.BaseRequest, who: Identity, change: Change, wait: float | None
    ) -> web.Response:
        if change.errors:
            self.ads.metrics.admin_change(who.role.value, "invalid")
            return _json(400, {"errors": change.errors})
        self.ads.metrics.admin_change(who.role.value, "applied")
        audit.info(
            "audit: %s (%s) from %s: %s %s: changed %s; version %s -> %s",
            who.name,
            who.role.value,
            request.remote,
            request.method,
            _shown(request),
            json.dumps(change.keys),
            change.before.version,
            change.after.version,
        )
        after = change.after
        answer: dict[str, Any] = {"version": after.version, "generation": after.generation}
        if wait is not None:
            engines = self.ads.connected()
            self.extend_deadline(request, wait)
            results = await wait_for_engines(self.ads, after, engines, wait)
            answer["allAcked"] = all(r.acked for r in results)
            answer["engines"] = [r.as_json() for r in results]
            log.info(
                "admin: %s %s: version %s: %s",
                request.method,
                _shown(request),
                after.version,
                ", ".join(f"{printable(r.node or r.peer)} {r.result}" for r in results)
                or "no engine",
            )
        return _json(200, answer)

    async def _parse(self, request: web.BaseRequest) -> tuple[Any, web.Response | None]:
        body = await self._body(request)
        if not body.strip():
            return None, _json(400, {"errors": ["body: empty (send JSON or YAML)"]})
        try:
            return await asyncio.to_thread(load_yaml, body), None
        except YamlError as exc:
            return None, _json(400, {"errors": [f"body: {exc}"]})

    async def _body(self, request: web.BaseRequest, limit: int | None = None) -> bytes:
        limit = self.limits.max_body if limit is None else limit
        if request.content_length is not None and request.content_length > limit:
            raise _TooLarge(limit)
        data = bytearray()
        async for chunk in request.content.iter_any():
            data += chunk
            if len(data) > limit:
                raise _TooLarge(limit)
        return bytes(data)

    async def _explain(self, request: web.BaseRequest) -> web.Response:
        body = await self._body(request, min(self.limits.max_body, MAX_EXPLAIN_BODY))
        status, payload, version = await self.explainer.answer(body)
        return _json(status, payload, {TABLE_VERSION_HEADER: version})


def _wait_of(request: web.BaseRequest) -> tuple[float | None, web.Response | None]:
    """The ``?wait=`` seconds (None: not asked), or the 400 for a wrong one."""
    if "wait" not in request.query:
        return None, None
    text = request.query.get("wait", "")
    if request.method not in ("PUT", "DELETE"):
        return None, _json(
            400, {"errors": [f"wait: only with PUT or DELETE, not {request.method}"]}
        )
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_WAIT:  # also NaN and inf
        return None, _json(
            400,
            {
                "errors": [
                    f"wait: must be a number of seconds in (0, {MAX_WAIT:g}], got {text[:40]!r}"
                ]
            },
        )
    return seconds, None


class _LimitedServer(web.Server):
    """aiohttp's low-level server with a cap on open connections and on their lifetime."""

    def __init__(self, handler: AdminApi, limits: AdminLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self._deadlines: dict[RequestHandler, asyncio.TimerHandle] = {}
        handler.extend_deadline = self._extend

    def _extend(self, request: web.BaseRequest, seconds: float) -> None:
        """Close ``request``'s connection no sooner than ``seconds`` plus the usual
        timeout from now (the server, not the client, is taking the time)."""
        handler = request.protocol
        timer = self._deadlines.get(handler)
        if timer is None or handler.transport is None:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds + self.limits.timeout
        if when > timer.when():
            timer.cancel()
            self._deadlines[handler] = loop.call_at(when, handler.transport.close)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._deadlines) >= self.limits.max_connections:
            log.warning(
                "admin: %d connections open; refusing one from %s",
                len(self._deadlines),
                transport.get_extra_info("peername"),
            )
            body = b'{"errors": ["too many admin connections"]}\n'
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            transport.close()
            return
        loop = asyncio.get_running_loop()
        self._deadlines[handler] = loop.call_later(self.limits.timeout, transport.close)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        timer = self._deadlines.pop(handler, None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(handler, exc)


class CertReloader:
    """A server :class:`ssl.SSLContext` whose certificate follows its files.

    :meth:`run` checks ``cert`` and ``key`` every ``interval`` seconds; once they have
    changed and settled (:mod:`engine.settle`) ``load_cert_chain`` is called again on the
    same context, so new connections get the new certificate and open ones keep theirs.
    A pair that does not load (a key from another certificate, a half-written file) is
    logged and the previous certificate keeps serving.
    """

    def __init__(
        self, cert: str | Path, key: str | Path, *, interval: float = 1.0, settle: float = 1.0
    ) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self.interval = interval
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._files = SettledFiles(lambda: [self.cert, self.key], settle)
        self._files.take()
        self.context.load_cert_chain(self.cert, self.key)  # start-up: errors propagate

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_once()

    async def check_once(self) -> bool:
        """True if a new certificate was loaded."""
        try:
            if await asyncio.to_thread(self._files.poll) is None:
                return False
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "admin TLS: cannot load %s / %s (%s); keeping the previous certificate",
                self.cert,
                self.key,
                exc,
            )
            return False
        log.info("admin TLS: certificate reloaded from %s", self.cert)
        return True


class AdminServer:
    """Serves :class:`AdminApi` on ``host:port`` (port 0 picks one)."""

    def __init__(self, api: AdminApi, ssl_context: ssl.SSLContext | None = None) -> None:
        self.api = api
        self.ssl_context = ssl_context
        self.port = 0
        self._runner: web.ServerRunner | None = None

    async def start(self, host: str, port: int) -> int:
        limits = self.api.limits
        server = _LimitedServer(
            self.api,
            limits,
            keepalive_timeout=limits.keepalive,
            max_line_size=limits.max_head_line,
            max_field_size=limits.max_head_line,
            max_headers=limits.max_headers,
            access_log=None,
        )
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host or None, port, ssl_context=self.ssl_context, backlog=128
        )
        try:
            await site.start()
        except BaseException:
            await self.stop()
            raise
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None
