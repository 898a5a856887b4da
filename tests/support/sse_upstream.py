"""A streaming upstream for tests: server-sent events with delays, and an upload sink.

:class:`SseUpstream` is a threaded HTTP/1.1 server on 127.0.0.1 (a free port):

* ``GET`` (any path): answers ``200`` ``text/event-stream`` (or the ``x-sse-content-type``
  request header's type), chunked, then writes each piece of :attr:`SseUpstream.script`
  (``(delay_seconds, bytes)``, one chunked-encoding chunk per piece, flushed at once),
  recording when each piece left (:attr:`SseUpstream.sent`, ``time.monotonic()``). A
  ``x-sse-script`` request header names another script set with :meth:`SseUpstream.set_script`
  (which can also make the upstream hang up mid-stream).
* ``POST``/``PUT``: reads the body (Content-Length or chunked) without keeping it, and
  answers JSON ``{"bytes": <count>, "sha256": <hex>}``: a 200 MB upload costs no memory.

A client that hangs up mid-stream ends that connection's writer quietly (recorded in
:attr:`SseUpstream.aborted`). Every connection is bounded by a socket timeout; :meth:`close`
stops the server.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Final

__all__ = ["SseUpstream", "llm_answer", "read_stream", "sse_event"]

HOST: Final = "127.0.0.1"


def sse_event(data: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE event, ``data`` split into ``data:`` lines, ended by a blank line."""
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


def llm_answer(total_tokens: int) -> list[tuple[float, bytes]]:
    """An OpenAI-style streamed answer whose last event before [DONE] carries the usage."""
    delta = {"model": "gpt-test", "choices": [{"delta": {"content": "token"}}]}
    usage = {
        "model": "gpt-test",
        "choices": [],
        "usage": {
            "prompt_tokens": 2,
            "completion_tokens": total_tokens - 2,
            "total_tokens": total_tokens,
        },
    }
    script = [(0.0, sse_event(json.dumps(delta))), (0.05, sse_event(json.dumps(delta)))]
    return [*script, (0.05, sse_event(json.dumps(usage))), (0.0, sse_event("[DONE]"))]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # each piece must leave at once
    timeout = 30  # socket timeout: no connection outlives a stuck test
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        name = self.headers.get("x-sse-script", "")
        script = self.server.scripts.get(name, ())
        self.send_response(200)
        content_type = self.headers.get("x-sse-content-type", "text/event-stream")
        self.send_header("content-type", content_type)
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        sent: list[float] = []
        try:
            for delay, piece in script:
                if delay:
                    time.sleep(delay)
                if piece:
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.flush()
                sent.append(time.monotonic())
            if name in self.server.aborting:  # hang up mid-stream: no final chunk
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the client (Envoy) hung up mid-stream
            with self.server.lock:
                self.server.aborted += 1
            self.close_connection = True
        finally:
            with self.server.lock:
                self.server.sent.append(sent)

    def _body_digest(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        count = 0
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    block = self.rfile.read(min(remaining, 1 << 16))
                    if not block:
                        raise OSError("body cut short")
                    digest.update(block)
                    count += len(block)
                    remaining -= len(block)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("content-length", "0") or 0)
            while remaining:
                block = self.rfile.read(min(remaining, 1 << 16))
                if not block:
                    raise OSError("body cut short")
                digest.update(block)
                count += len(block)
                remaining -= len(block)
        return count, digest.hexdigest()

    def do_POST(self) -> None:
        try:
            count, hexdigest = self._body_digest()
        except OSError:
            self.close_connection = True
            return
        payload = json.dumps({"bytes": count, "sha256": hexdigest}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_PUT = do_POST


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _Handler)
        self.lock = threading.Lock()
        self.scripts: dict[str, Sequence[tuple[float, bytes]]] = {}
        self.aborting: set[str] = set()
        self.sent: list[list[float]] = []
        self.aborted = 0


class SseUpstream:
    """The streaming upstream. Use as a context manager (or call :meth:`close`)."""

    def __init__(self) -> None:
        self._server = _Server()
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def set_script(
        self, pieces: Sequence[tuple[float, bytes]], name: str = "", *, hang_up: bool = False
    ) -> None:
        """What a ``GET`` (with ``x-sse-script: name``) streams: ``(delay, bytes)`` pieces;
        ``hang_up``: then close the connection without ending the body (an upstream dying
        mid-stream)."""
        with self._server.lock:
            self._server.scripts[name] = tuple(pieces)
            if hang_up:
                self._server.aborting.add(name)
            else:
                self._server.aborting.discard(name)

    @property
    def sent(self) -> list[list[float]]:
        """Per finished ``GET``: when each piece was written (``time.monotonic()``)."""
        with self._server.lock:
            return [list(times) for times in self._server.sent]

    @property
    def aborted(self) -> int:
        """Streams the client hung up on before the script ended."""
        with self._server.lock:
            return self._server.aborted

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> SseUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_stream(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, list[tuple[float, bytes]]]:
    """GET ``path`` on 127.0.0.1:``port`` and read the chunked body as it arrives:
    ``(status, [(monotonic time, bytes received)...])``. Raw socket reads, so the time a
    piece arrived is when it arrived, not when the whole body did. A body that is not
    chunked is one piece (Content-Length bytes, or up to the close)."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    pieces: list[tuple[float, bytes]] = []
    reader: BinaryIO | None = None
    try:
        head = f"GET {path} HTTP/1.1\r\nhost: {HOST}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        sock.sendall((head + "\r\n").encode())
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        chunked = False
        length: int | None = None
        while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name.strip().lower() == "content-length":
                length = int(value.strip())
        if not chunked:
            data = reader.read() if length is None else reader.read(length)
            pieces.append((time.monotonic(), data))
            return status, pieces
        while True:
            size_line = reader.readline()
            if not size_line:
                raise OSError("stream cut short")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                reader.readline()
                return status, pieces
            data = reader.read(size)
            reader.readline()
            pieces.append((time.monotonic(), data))
    finally:
        if reader is not None:
            reader.close()
        sock.close()
