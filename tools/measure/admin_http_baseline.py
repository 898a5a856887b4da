"""The control plane's former admin HTTP server (``controlplane/http.py`` until aiohttp
replaced it), kept only as the baseline of ``tools/measure/admin_http_servers.py``.

A small asyncio HTTP/1.1 server: enough for an admin API, nothing more.

One request per connection (``Connection: close``), ``Content-Length`` bodies only
(no chunked uploads), bounded head and body sizes, a read timeout. Handlers are
``async (Request) -> Response``. Written here rather than adding a web framework: the
admin API has five routes and runs on the control plane's own event loop next to the
gRPC server; stdlib's ``http.server`` is thread-based.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import unquote, urlsplit

__all__ = ["HttpServer", "Request", "Response", "json_response"]

log: Final = logging.getLogger("controlplane.http")

MAX_HEAD: Final = 64 * 1024
MAX_BODY: Final = 8 * 1024 * 1024
READ_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # decoded, without the query string
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, payload: Any) -> Response:
    return Response(status, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """Serves ``handler`` on ``host:port`` (port 0 picks one; see :attr:`port`)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._connection, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    request = await self._read(reader)
            except TimeoutError:
                response = json_response(408, {"errors": ["request not received in time"]})
            except _BadRequest as exc:
                response = json_response(exc.status, {"errors": [str(exc)]})
            else:
                try:
                    response = await self.handler(request)
                except Exception:  # a handler bug answers 500, the server keeps going
                    log.exception("%s %s failed", request.method, request.path)
                    response = json_response(500, {"errors": ["internal error (see the log)"]})
            await self._write(writer, response)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> Request:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise _BadRequest(431, "request head too large") from exc
        if len(head) > MAX_HEAD:
            raise _BadRequest(431, "request head too large")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, f"malformed request line {lines[0]!r}")
        method, target, _ = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, f"malformed header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest(411, "send the body with Content-Length (chunked is not supported)")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError as exc:
            raise _BadRequest(400, "Content-Length must be a number") from exc
        if length < 0 or length > MAX_BODY:
            raise _BadRequest(413, f"body must be 0-{MAX_BODY} bytes")
        body = await reader.readexactly(length) if length else b""
        return Request(method.upper(), unquote(urlsplit(target).path), headers, body)

    async def _write(self, writer: asyncio.StreamWriter, response: Response) -> None:
        reason = HTTPStatus(response.status).phrase
        head = [
            f"HTTP/1.1 {response.status} {reason}",
            f"content-type: {response.content_type}",
            f"content-length: {len(response.body)}",
            "connection: close",
            *(f"{k}: {v}" for k, v in response.headers.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        await writer.drain()


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
