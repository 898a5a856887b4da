"""engine.transport.http_server: the HTTP/1.1 server of the HTTP ext_proc transport, over
real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import uvloop

from engine.tls import ServerTls, ServerTlsFiles
from engine.tls_testing import TestPki
from engine.transport.http_server import MAX_CHUNKS, HttpServer, start_http_server

WAIT = 10.0


def echo_now(path: str, body: bytes) -> tuple[int, bytes]:
    """A handler answering at once (no task: the server answers within data_received)."""
    return 200, b'{"path": "' + path.encode() + b'", "len": ' + str(len(body)).encode() + b"}"


async def echo(path: str, body: bytes) -> tuple[int, bytes]:
    """A handler the server runs in a task."""
    if body == b"slow":
        await asyncio.sleep(0.3)
    if body == b"boom":
        raise RuntimeError("handler bug")
    return echo_now(path, body)


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    srv = await start_http_server(
        "127.0.0.1:0", echo, max_request_bytes=1000, header_timeout=0.3, idle_timeout=0.6
    )
    try:
        yield srv
    finally:
        await srv.close(1.0)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
        return status, headers, body


def post(body: bytes, *, extra: str = "") -> bytes:
    return (
        f"POST /x HTTP/1.1\r\nhost: e\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body
    )


_WRITERS: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def close_writers() -> AsyncIterator[None]:
    yield
    while _WRITERS:
        writer = _WRITERS.pop()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def connect(
    srv: HttpServer, **kwargs: object
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, **kwargs)  # type: ignore[arg-type]
    _WRITERS.append(writer)
    return reader, writer


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (the server's counters have no event to wait on)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def closed(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(WAIT):
        return await reader.read() == b""


async def test_keep_alive_and_pipelined_requests(server):
    reader, writer = await connect(server)
    writer.write(post(b"abc") + post(b"abcdef"))
    assert await read_response(reader) == (
        200,
        {"content-type": "application/json", "content-length": "24"},
        b'{"path": "/x", "len": 3}',
    )
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b'{"path": "/x", "len": 6}')
    writer.write(post(b"again"))
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_many_pipelined_requests_in_one_read(server):
    """Requests answered at once are served in a loop: 2,000 pipelined ones (beyond
    Python's recursion limit) are all answered, in order."""
    reader, writer = await connect(server)
    writer.write(b"".join(post(str(i).encode()) for i in range(2000)))
    for i in range(2000):
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b'{"path": "/x", "len": ' + str(len(str(i))).encode() + b"}")
    writer.close()


async def test_chunked_body_split_across_reads(server):
    reader, writer = await connect(server)
    message = (
        b"POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    for i in range(len(message)):  # one byte at a time
        writer.write(message[i : i + 1])
        await writer.drain()
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b'{"path": "/c", "len": 5}')
    writer.close()


async def test_chunked_framing_counts_toward_the_size_limit(server):
    """600 one-byte chunks: a 600-byte body in 3,600 buffered bytes, over the 1,000 limit."""
    reader, writer = await connect(server)
    writer.write(b"POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 600)
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (413, "close")


async def test_a_chunked_body_has_at_most_max_chunks():
    srv = HttpServer(echo_now, max_request_bytes=100_000, header_timeout=10, idle_timeout=300)
    connection = srv._protocol()
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    head = b"POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
    connection.data_received(head + b"1\r\na\r\n" * MAX_CHUNKS + b"0\r\n\r\n")
    assert transport.written[-1].endswith(b'{"path": "/c", "len": %d}' % MAX_CHUNKS)
    connection = srv._protocol()
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(head + b"1\r\na\r\n" * (MAX_CHUNKS + 1) + b"0\r\n\r\n")
    assert transport.written[-1].startswith(b"HTTP/1.1 400 ")
    assert f"more than {MAX_CHUNKS} chunks".encode() in transport.written[-1]
    await srv.close(1.0)


class CountingBuffer(bytearray):
    """A connection's buffer that counts the searches made in it."""

    finds = 0

    def find(self, *args: object) -> int:
        self.finds += 1
        return super().find(*args)  # type: ignore[arg-type]


async def test_a_chunked_body_is_parsed_once_whatever_the_number_of_reads():
    """Each read parses only the new chunks, never the body again from its start (which
    took seconds of the event loop, both transports', for a few MB of tiny chunks)."""
    srv = HttpServer(echo_now, max_request_bytes=100_000, header_timeout=10, idle_timeout=300)
    connection = srv._protocol()
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection._buffer = buffer = CountingBuffer()
    connection.data_received(b"POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
    for _ in range(2000):  # one chunk per read
        connection.data_received(b"1\r\na\r\n")
    connection.data_received(b"0\r\n\r\n")
    assert transport.written == [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 27\r\n\r\n"
        b'{"path": "/c", "len": 2000}'
    ]
    assert buffer.finds <= 4 * 2000, "quadratic: every read parsed every chunk again"
    await srv.close(1.0)


async def test_connection_close_is_honoured(server):
    reader, writer = await connect(server)
    writer.write(post(b"a", extra="connection: close\r\n"))
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (200, "close")
    assert await closed(reader)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (post(b"x" * 1001), 413),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3e9\r\n", 413),
        (b"GET / HTTP/1.1\r\n\r\n", 405),
        (b"POST / HTTP/2.0\r\ncontent-length: 0\r\n\r\n", 400),
        (b"garbage\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\n" + b"x-big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0x1\r\na\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n+1\r\na\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n 1\r\na\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\n bad: folded\r\n\r\n", 400),
        # more digits than int() converts (4,300): a 400, not an exception in data_received
        (b"POST / HTTP/1.1\r\ncontent-length: " + b"1" * 5000 + b"\r\n\r\n", 400),
    ],
    ids=[
        "too-large",
        "chunked-too-large",
        "not-post",
        "version",
        "request-line",
        "two-lengths",
        "negative-length",
        "other-encoding",
        "length-and-chunked",
        "headers-too-large",
        "bad-chunk-size",
        "chunk-size-0x",
        "chunk-size-plus",
        "chunk-size-space",
        "folded-header",
        "length-of-5000-digits",
    ],
)
async def test_bad_requests_are_answered_and_closed(server, raw, status):
    reader, writer = await connect(server)
    writer.write(raw)
    got, headers, _ = await read_response(reader)
    assert (got, headers["connection"]) == (status, "close")
    assert await closed(reader)


async def test_handler_failure_is_a_500_and_the_connection_lives(server):
    reader, writer = await connect(server)
    writer.write(post(b"boom"))
    assert (await read_response(reader))[0] == 500
    writer.write(post(b"ok"))
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_incomplete_request_times_out(server):
    reader, writer = await connect(server)
    writer.write(b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc")
    status, _, _ = await read_response(reader)
    assert status == 408
    assert await closed(reader)


async def test_header_timeout_counts_from_the_request_not_the_previous_answer():
    """A kept-alive connection idle longer than the header timeout (not the idle one) then
    sends a request in two pieces: it is answered, not cut with a 408 at the first sweep."""
    srv = await start_http_server(
        "127.0.0.1:0", echo, max_request_bytes=1000, header_timeout=1.0, idle_timeout=10.0
    )
    try:
        reader, writer = await connect(srv)
        writer.write(post(b"a"))
        assert (await read_response(reader))[0] == 200
        await asyncio.sleep(1.5)  # idle: longer than header_timeout, shorter than idle_timeout
        message = post(b"second")
        writer.write(message[:10])
        await asyncio.sleep(0.5)  # the rest within header_timeout (sweeps every 0.25 s)
        writer.write(message[10:])
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        await srv.close(1.0)


async def test_idle_connection_is_closed(server):
    reader, writer = await connect(server)
    writer.write(post(b"a"))
    assert (await read_response(reader))[0] == 200
    assert await closed(reader)  # idle_timeout 0.6 s


async def test_close_lets_in_flight_requests_answer():
    srv = await start_http_server("127.0.0.1:0", echo)
    reader, writer = await connect(srv)
    idle_reader, _ = await connect(srv)
    writer.write(post(b"slow"))
    await wait_for(lambda: srv.in_flight > 0)
    closing = asyncio.create_task(srv.close(5.0))
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (200, "close")
    assert await closed(idle_reader)
    async with asyncio.timeout(WAIT):
        await closing
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", srv.port)


async def test_tls_with_client_certificates(tmp_path: Path):
    pki = TestPki(tmp_path)
    issued, client = pki.server("engine"), pki.client("envoy")
    tls = ServerTls(ServerTlsFiles(str(issued.cert), str(issued.key), str(pki.ca_file)))
    srv = await start_http_server("127.0.0.1:0", echo, tls=tls)
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        context.load_cert_chain(str(client.cert), str(client.key))
        reader, writer = await connect(srv, ssl=context, server_hostname="localhost")
        writer.write(post(b"tls"))
        assert (await read_response(reader))[0] == 200
        writer.close()
        anonymous = ssl.create_default_context(cafile=str(pki.ca_file))

        async def without_certificate() -> None:
            reader, writer = await connect(srv, ssl=anonymous, server_hostname="localhost")
            writer.write(post(b"no cert"))
            await read_response(reader)

        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await without_certificate()
    finally:
        await srv.close(1.0)


def test_serves_on_uvloop():
    """The engine runs on uvloop (engine.transport.server.run_loop), whose transports are its
    own."""

    async def exchange() -> tuple[int, dict[str, str], bytes]:
        srv = await start_http_server("127.0.0.1:0", echo)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(post(b"uv"))
            try:
                return await read_response(reader)
            finally:
                writer.close()
                await writer.wait_closed()
        finally:
            await srv.close(1.0)

    status, _, body = uvloop.run(exchange())
    assert (status, body) == (200, b'{"path": "/x", "len": 2}')


_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_var", default="unset")


async def suspending(path: str, body: bytes) -> tuple[int, bytes]:
    """A handler that suspends in every way (bare yield, a future, a sleep), keeps its own
    context across the suspensions, and fails after one when asked."""
    token = _VAR.set(body.decode())
    try:
        await asyncio.sleep(0)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_result, "done")
        assert await future == "done"
        await asyncio.sleep(0.01)
        if body.startswith(b"fail"):
            raise RuntimeError("after a suspension")
        return 200, f'"{_VAR.get()}"'.encode()
    finally:
        _VAR.reset(token)  # raises if the context changed between the steps


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_handlers_that_suspend_resume_in_their_own_context(loop: str) -> None:
    async def exchange() -> list[tuple[int, bytes]]:
        srv = await start_http_server("127.0.0.1:0", suspending)
        try:
            answers = []
            streams = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(3)]
            for i, (_, writer) in enumerate(streams):  # concurrent: interleaved steps
                writer.write(post(b"fail" if i == 1 else f"req{i}".encode()))
            for reader, writer in streams:
                status, _, body = await read_response(reader)
                answers.append((status, body))
                writer.close()
                await writer.wait_closed()
            assert _VAR.get() == "unset", "no handler's context leaked into the loop's"
            return answers
        finally:
            await srv.close(1.0)

    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(exchange()) == [
        (200, b'"req0"'),
        (500, b'{"error": "internal error"}'),
        (200, b'"req2"'),
    ]


async def leaky(path: str, body: bytes) -> tuple[int, bytes]:
    """Answers what it found in its context, then sets the variable (as the stream machine
    sets the request id of its log lines)."""
    seen = _VAR.get()
    _VAR.set(body.decode())
    if body == b"slow":
        await asyncio.sleep(0.01)
    return 200, f'"{seen}"'.encode()


@pytest.mark.parametrize("first", [b"fast", b"slow"])
async def test_pipelined_requests_do_not_inherit_each_others_context(first: bytes) -> None:
    """Each request starts from the connection's context, never from the previous
    request's (its request id would be logged on the next request's lines)."""
    srv = await start_http_server("127.0.0.1:0", leaky)
    try:
        reader, writer = await connect(srv)
        writer.write(post(first) + post(b"second"))
        assert (await read_response(reader))[2] == b'"unset"'
        assert (await read_response(reader))[2] == b'"unset"'
    finally:
        await srv.close(1.0)


class FakeTransport:
    """Records what the connection does to its transport."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.paused = False
        self.pauses = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        pass


async def test_reading_pauses_while_a_request_is_served_and_more_than_one_is_buffered():
    release = asyncio.Event()

    async def held(path: str, body: bytes) -> tuple[int, bytes]:
        await release.wait()
        return 200, b"{}"

    srv = HttpServer(held, max_request_bytes=1000, header_timeout=10, idle_timeout=300)
    connection = srv._protocol()
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(post(b"first"))
    assert connection.busy
    for _ in range(60):  # a client pipelining far more than one request meanwhile
        connection.data_received(post(b"x" * 500))
    assert transport.paused, "reading stops: the buffer stays bounded"
    release.set()
    await wait_for(lambda: not transport.paused)
    await wait_for(lambda: len(transport.written) >= 2)
    await srv.close(1.0)


async def test_a_handler_that_awaits_runs_in_a_task_of_its_own():
    """What the handler does not answer at once runs in a task: asyncio.timeout and
    asyncio.current_task work there (policies use them; outside a task the first raised
    "Timeout should be used inside a task")."""
    seen: list[object] = []

    async def timed(path: str, body: bytes) -> tuple[int, bytes]:
        async with asyncio.timeout(5):
            seen.append(asyncio.current_task())
            await asyncio.sleep(0)
        return 200, b"{}"

    srv = await start_http_server("127.0.0.1:0", timed)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(post(b"x") + post(b"y"))  # pipelined: each in its own task
        assert (await read_response(reader))[0] == 200
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        await srv.close(1.0)
    assert len(seen) == 2
    assert None not in seen
    assert seen[0] is not seen[1]
