"""A small HTTP/1.1 server for Envoy's ``http_service`` ext_proc transport.

One client matters: Envoy's ext_proc filter, which POSTs one JSON ``ProcessingRequest`` per
message and waits for the JSON ``ProcessingResponse`` (``engine.transport.http_service``).
The server is a raw :class:`asyncio.Protocol` on the engine's uvloop, with a strict parser
of just what HTTP/1.1 needs here (request line, headers, ``Content-Length`` or chunked bodies),
because everything per request costs CPU the transport is chosen to save
(docs/decisions.md: no framework; measured in ``tools/bench/http_transport.py``).

Limits and timeouts (anything else is answered 400/413/431 and the connection closed)
    * headers at most :data:`MAX_HEADER_BYTES`, body at most ``max_request_bytes`` (a
      chunked body's framing included: it is buffered too), in at most :data:`MAX_CHUNKS`
      chunks (chunk sizes strictly hex);
    * a started request must be complete within ``header_timeout`` seconds (slow-loris);
    * a connection idle for ``idle_timeout`` seconds is closed;
    * keep-alive is the default (HTTP/1.1); ``connection: close`` is honoured. Requests are
      answered in order, one at a time per connection (pipelining works, is not assumed);
      while one is served, reading stops once more than a whole request is buffered.

Shutdown (:meth:`HttpServer.close`): stop accepting, close idle connections, let the
requests in flight answer (with ``connection: close``) within the grace period, then close
what is left.

TLS: the listener's :class:`engine.tls.ServerTls` (mTLS with a client CA); rotated files are
taken at the next handshake (the SNI callback swaps the context).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Final, cast

from engine.tls import ServerTls

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_HEADER_BYTES",
    "Handler",
    "HttpServer",
    "start_http_server",
]

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], "tuple[int, bytes] | Awaitable[tuple[int, bytes]]"]
"""``handler(path, body)`` for one POST: ``(status, JSON body)`` when it can answer at once,
else an awaitable of it, which runs in a task of its own (so the code behind it may use
anything asyncio offers: ``asyncio.timeout`` and ``asyncio.current_task`` need a task)."""

MAX_HEADER_BYTES: Final = 16 * 1024
MAX_CHUNKS: Final = 4096
"""Chunks in one chunked body: each costs a few microseconds of the event loop, which a
client sending one-byte chunks up to the size limit (some 700,000) would otherwise hold."""
_CHUNK_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,8}")
"""A chunk-size (RFC 9112 section 7.1: hex digits only; ``int(x, 16)`` alone would also take
``0x5``, ``+5``, ``1_0`` or spaces, which a proxy in front may read differently)."""
DEFAULT_MAX_REQUEST_BYTES: Final = 4 * 1024 * 1024
"""Largest JSON message accepted: Envoy's own header limits (60 KiB by default) in base64
JSON stay far below it."""

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


_INTERNAL_ERROR: Final = (500, b'{"error": "internal error"}')


class _BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class _Connection(asyncio.Protocol):
    """One client connection: parse, hand each request to the handler, answer in order."""

    __slots__ = (
        "_buffer",
        "_chunks",
        "_context",
        "_server",
        "_transport",
        "busy",
        "closing",
        "paused",
        "since",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._context = contextvars.Context()
        self._buffer = bytearray()
        self._chunks: _Chunks | None = None  # the chunked body being read
        self.busy = False
        self.closing = False
        self.paused = False
        # Loop time of the last answer (or the connection's start), or of the first byte of
        # a request that started on an idle connection: the sweep measures the idle and
        # header timeouts from it (no timer per request).
        self.since = server.loop.time()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        # Each request runs in a copy of this one: never in a copy of the request before
        # (a pipelined request is started from inside the previous one's context).
        self._context = contextvars.copy_context()
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if not self._buffer and not self.busy:
            # A new request starts: its header timeout counts from now, not from the
            # previous answer (a kept-alive connection may have been idle since).
            self.since = self._server.loop.time()
        self._buffer += data
        if not self.busy:
            self._next()
        elif len(self._buffer) > self._server.max_request_bytes + MAX_HEADER_BYTES:
            # Pipelined data beyond one whole request while one is served: stop reading
            # (the client's sends block) until the answer is out. Memory stays bounded.
            self.paused = True
            if self._transport is not None:
                self._transport.pause_reading()

    def expire(self, now: float) -> None:
        """Called by the server's sweep: enforce the header and idle timeouts."""
        if self.busy or self.closing:
            return
        if self._buffer:  # a request started and is not complete
            if now - self.since > self._server.header_timeout:
                self._fail(_BadRequest(408, "request not complete within the header timeout"))
        elif now - self.since > self._server.idle_timeout:
            self.close()

    # -- requests -------------------------------------------------------------------------

    def _next(self) -> None:
        """Serve the complete requests in the buffer, in order: in a loop while each is
        answered at once (pipelined requests never recurse), until one needs a task (which
        serves the rest when it is done, :meth:`_serve`) or no complete request is left."""
        while self._transport is not None and not self.closing:
            try:
                parsed = self._parse()
            except _BadRequest as exc:
                self._fail(exc)
                return
            if parsed is None:
                return
            path, body, keep_alive = parsed
            self.busy = True
            server = self._server
            server.in_flight += 1
            server.idle.clear()
            # The handler answers at once where it can (a task per request costs more than
            # a static chain's whole answer); what it cannot answer at once runs in a task,
            # in the same copy of the connection's context.
            context = self._context.copy()
            try:
                result = context.run(server.handler, path, body)
            except Exception:
                log.exception("HTTP ext_proc handler failed")
                result = _INTERNAL_ERROR
            if isinstance(result, tuple):
                self._finish(result, keep_alive)
                continue
            task = server.loop.create_task(self._serve(result, keep_alive), context=context)
            server.tasks.add(task)
            task.add_done_callback(server.tasks.discard)
            return

    async def _serve(self, pending: Awaitable[tuple[int, bytes]], keep_alive: bool) -> None:
        """A request the handler answers later: answer it, then serve what was pipelined."""
        try:
            result = await pending
        except Exception:
            log.exception("HTTP ext_proc handler failed")
            result = _INTERNAL_ERROR
        self._finish(result, keep_alive)
        self._next()

    def _finish(self, result: tuple[int, bytes], keep_alive: bool) -> None:
        try:
            status, reply = result
            self._answer(status, reply, keep_alive=keep_alive and not self._server.stopping)
        finally:
            self.busy = False
            self.since = self._server.loop.time()
            self._server.request_done()
        if self.paused and self._transport is not None and not self.closing:
            self.paused = False
            self._transport.resume_reading()

    def _answer(self, status: int, body: bytes, *, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            + ("" if keep_alive else "connection: close\r\n")
            + "\r\n"
        )
        transport.write(head.encode("latin-1") + body)
        if not keep_alive:
            self.close()

    def _fail(self, exc: _BadRequest) -> None:
        log.debug("HTTP ext_proc: bad request (%s): %s", exc.status, exc)
        self._buffer.clear()
        self._chunks = None
        body = b'{"error": "' + str(exc).encode("ascii", "replace") + b'"}'
        self._answer(exc.status, body, keep_alive=False)

    def close(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.close()

    def _parse(self) -> tuple[str, bytes, bool] | None:
        """``(path, body, keep_alive)`` of the first complete request, removed from the
        buffer; None while incomplete. Raises :class:`_BadRequest`."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise _BadRequest(431, "request headers too large")
            return None
        if end > MAX_HEADER_BYTES:
            raise _BadRequest(431, "request headers too large")
        lines = bytes(buffer[:end]).split(b"\r\n")
        try:
            method, target, version = lines[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise _BadRequest(400, "malformed request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _BadRequest(400, "unsupported HTTP version")
        length = -1
        chunked = False
        keep_alive = version == "HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, "malformed header line")
            lname = name.lower()
            if lname == b"content-length":
                digits = value.strip()
                # At most 18 digits: int() refuses more than 4,300 (ValueError).
                if length >= 0 or not digits.isdigit() or len(digits) > 18:
                    raise _BadRequest(400, "bad content-length")
                length = int(digits)
            elif lname == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise _BadRequest(501, "unsupported transfer-encoding")
                chunked = True
            elif lname == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    keep_alive = False
                elif token == b"keep-alive":
                    keep_alive = True
        if chunked and length >= 0:
            raise _BadRequest(400, "content-length with chunked transfer-encoding")
        if method != "POST":
            raise _BadRequest(405, "only POST")
        limit = self._server.max_request_bytes
        start = end + 4
        if chunked:
            chunks = self._chunks
            if chunks is None:
                chunks = self._chunks = _Chunks(start)
            chunked_body = _dechunk(buffer, chunks, start + limit)
            if chunked_body is None:
                return None
            self._chunks = None
            body, consumed = chunked_body, chunks.at
        else:
            length = max(length, 0)
            if length > limit:
                raise _BadRequest(413, "request too large")
            if len(buffer) - start < length:
                return None
            body = bytes(buffer[start : start + length])
            consumed = start + length
        del buffer[:consumed]
        return target, body, keep_alive


class _Chunks:
    """A chunked body read so far, kept between reads: each chunk is parsed once."""

    __slots__ = ("at", "parts")

    def __init__(self, at: int) -> None:
        self.at = at  # buffer offset of the next chunk-size line
        self.parts: list[bytes] = []


def _dechunk(buffer: bytearray, chunks: _Chunks, end: int) -> bytes | None:
    """The chunked body, parsed on from ``chunks.at``; None while incomplete (``chunks``
    keeps the chunks parsed). Its framing counts toward the limit: nothing of it may lie
    beyond the buffer offset ``end``. Trailers are not accepted (Envoy sends none)."""
    at = chunks.at
    while True:
        eol = buffer.find(b"\r\n", at, at + 32)
        if eol < 0:
            if len(buffer) - at > 32:
                raise _BadRequest(400, "malformed chunk size")
            return None
        size_text = bytes(buffer[at:eol]).partition(b";")[0]
        if _CHUNK_SIZE.fullmatch(size_text) is None:
            raise _BadRequest(400, "malformed chunk size")
        size = int(size_text, 16)
        if len(chunks.parts) >= MAX_CHUNKS and size:
            raise _BadRequest(400, f"more than {MAX_CHUNKS} chunks")
        data_start = eol + 2
        if data_start + size + 2 > end:
            raise _BadRequest(413, "request too large")
        if len(buffer) < data_start + size + 2:
            return None
        if buffer[data_start + size : data_start + size + 2] != b"\r\n":
            raise _BadRequest(400, "malformed chunk")
        chunks.at = data_start + size + 2
        if size == 0:
            return b"".join(chunks.parts)
        chunks.parts.append(bytes(buffer[data_start : data_start + size]))
        at = chunks.at


class HttpServer:
    """A listening HTTP ext_proc server (see the module docstring); :meth:`close` stops it."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_request_bytes: int,
        header_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.handler = handler
        self.max_request_bytes = max_request_bytes
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.stopping = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self.idle: asyncio.Event = asyncio.Event()
        self.idle.set()
        self._sweep_every = min(1.0, header_timeout / 4, idle_timeout / 4)
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            connection.expire(now)
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def request_done(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    def _protocol(self) -> _Connection:
        return _Connection(self)

    async def close(self, grace: float) -> None:
        """Stop accepting; idle connections close now, busy ones after their answer; what
        is still running after ``grace`` seconds is cancelled."""
        self.stopping = True
        self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if not connection.busy:
                connection.close()
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), grace)
        for task in list(self.tasks):
            task.cancel()
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


def _tls_context(tls: ServerTls) -> ssl.SSLContext:
    """A context that hands each handshake the current files' context (rotation)."""
    base = tls.ssl_context()

    def pick(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        try:
            current = tls.ssl_context()
        except Exception:  # never fail a handshake over a reload problem
            log.exception("TLS: checking %s for changes failed", tls.files.cert)
            return
        if current is not sslobj.context:
            sslobj.context = current

    base.sni_callback = pick
    return base


async def start_http_server(
    listen: str,
    handler: Handler,
    *,
    reuse_port: bool = False,
    tls: ServerTls | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    header_timeout: float = 10.0,
    idle_timeout: float = 300.0,
) -> HttpServer:
    """Listen on ``listen`` (``host:port``; port 0 picks one: :attr:`HttpServer.port`).
    Raises ``OSError`` when the address cannot be bound."""
    host, _, port = listen.rpartition(":")
    server = HttpServer(
        handler,
        max_request_bytes=max_request_bytes,
        header_timeout=header_timeout,
        idle_timeout=idle_timeout,
    )
    listener = await server.loop.create_server(
        server._protocol,
        host.strip("[]") or "127.0.0.1",
        int(port),
        reuse_port=reuse_port or None,
        ssl=_tls_context(tls) if tls is not None else None,
        ssl_handshake_timeout=10.0 if tls is not None else None,
        backlog=4096,
    )
    server._server = listener
    server.port = listener.sockets[0].getsockname()[1]
    return server
