"""A real ``redis-server`` for tests: started on a free 127.0.0.1 port, always stopped.

Debian's ``redis-server`` (``$REDIS_SERVER`` overrides the path; ``tools/bazel``
provisions it into its offline root, ``.ci/run`` installs it on the host for plain
pytest). No persistence (``--save '' --appendonly no``), so a restart starts empty,
as a crashed cache would. Every wait is bounded.

Use :func:`running_redis` (a context manager) or the ``redis_server`` fixture
(import it into a test module: ``from policies.rateLimit.testing import redis_server``)::

    def test_x(redis_server: RedisServer) -> None:
        redis_server.url            # redis://127.0.0.1:PORT/0
        redis_server.stop(); redis_server.start()   # same port: "Redis restarted"
        redis_server.command("DBSIZE")

:func:`delaying_proxy` puts a TCP proxy in front of it that delays every command by a
fixed time: a Redis that answers slowly, but answers (``DEBUG SLEEP`` blocks everyone).

Test-only code: nothing here is imported by a policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

__all__ = ["REDIS_SERVER", "RedisServer", "delaying_proxy", "redis_server", "running_redis"]

REDIS_SERVER = (
    os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
)
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` (a fresh port at construction;
    :meth:`start` after :meth:`stop` reuses it, so clients see a restart)."""

    def __init__(self, workdir: Path) -> None:
        if not os.access(REDIS_SERVER, os.X_OK):
            # Never a silent skip: these tests prove the shared limit works.
            pytest.fail(
                f"{REDIS_SERVER} not found: install Debian's redis-server "
                "(apt-get install -y redis-server; tools/bazel adds it to its offline root)"
            )
        self.workdir = workdir
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server and wait until it answers PING."""
        assert self.process is None, "already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                    # DEBUG SLEEP makes a slow Redis on demand (loopback clients only).
                    "--enable-debug-command", "local",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"redis-server exited ({code}):\n{self.log()}")
            with contextlib.suppress(OSError):
                if self.command("PING") == "PONG":
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer PING:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_TIMEOUT)

    def command(self, *args: str, timeout: float = 2.0) -> str | int | list[object] | None:
        """Send one command (RESP, blocking socket) and return the decoded reply."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout) as sock:
            sock.sendall(payload.encode())
            reader = sock.makefile("rb")
            return _read_reply(reader)

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a mapping."""
        text = self.command("INFO", section)
        assert isinstance(text, str)
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {key: value for key, value in pairs}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""


def _read_reply(reader: object) -> str | int | list[object] | None:
    readline = reader.readline  # type: ignore[attr-defined]
    read = reader.read  # type: ignore[attr-defined]
    line: bytes = readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = read(size + 2)
        return data[:-2].decode()
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise RuntimeError(f"unexpected reply {line!r}")


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit whatever happens."""
    server = RedisServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty Redis for one test."""
    with running_redis(tmp_path) as server:
        yield server


@contextlib.asynccontextmanager
async def delaying_proxy(port: int, delay: float) -> AsyncIterator[str]:
    """A TCP proxy on the running loop to ``127.0.0.1:port`` that holds every chunk the
    client sends for ``delay`` seconds before passing it on (replies pass at once), so
    each round trip takes at least ``delay``. Yields its ``redis://`` URL (database 0)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait: float) -> None:
        try:
            while data := await reader.read(65536):
                if wait:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    tasks: set[asyncio.Task[None]] = set()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        for task in (
            asyncio.create_task(pipe(reader, up_writer, delay)),
            asyncio.create_task(pipe(up_reader, writer, 0.0)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    proxy_port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{proxy_port}/0"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
