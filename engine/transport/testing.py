"""Test helpers for the ext_proc transports: build messages the way Envoy does, talk to a gRPC
server.

Message builders mirror what Envoy 1.36 sends (lower-case keys, values in ``raw_value``,
pseudo-headers first). :class:`ExtProcClient` is a tiny grpc.aio client playing Envoy's
part on one ``Process`` stream per :meth:`ExtProcClient.open`; :func:`decode` turns a reply
into plain Python for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from engine.store import ConfigStore
from engine.transport.grpc_service import ATTRIBUTES_KEY, ROUTE_METADATA_KEY, PolicyProcessor
from engine.transport.server import serve

__all__ = [
    "Decoded",
    "ExtProcClient",
    "ExtProcStream",
    "decode",
    "http_headers",
    "request_body",
    "request_headers",
    "response_body",
    "response_headers",
    "serving",
]

HeaderItems = Mapping[str, str] | Sequence[tuple[str, str]]


def _items(headers: HeaderItems | None) -> Iterable[tuple[str, str]]:
    if headers is None:
        return ()
    return headers.items() if isinstance(headers, Mapping) else headers


def http_headers(headers: HeaderItems | None, *, end_of_stream: bool) -> Any:
    """``HttpHeaders`` with every value in ``raw_value`` and keys lower-cased."""
    return pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key=k.lower(), raw_value=v.encode("utf-8"))
                for k, v in _items(headers)
            ]
        ),
        end_of_stream=end_of_stream,
    )


def request_headers(
    path: str = "/",
    method: str = "GET",
    headers: HeaderItems | None = None,
    *,
    end_of_stream: bool = True,
    authority: str = "example.test",
    attributes: Mapping[str, str] | None = None,
) -> Any:
    """A ``request_headers`` message; ``attributes`` go under the ext_proc attributes key."""
    pseudo = [(":authority", authority), (":path", path), (":method", method), (":scheme", "http")]
    message = pb.ProcessingRequest(
        request_headers=http_headers([*pseudo, *_items(headers)], end_of_stream=end_of_stream)
    )
    if attributes:
        struct = struct_pb2.Struct()
        struct.update(dict(attributes))
        message.attributes[ATTRIBUTES_KEY].CopyFrom(struct)
    return message


def request_body(body: bytes, *, end_of_stream: bool = True) -> Any:
    """A ``request_body`` message (BUFFERED: the whole body in one message)."""
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def response_headers(
    status: int = 200, headers: HeaderItems | None = None, *, end_of_stream: bool = True
) -> Any:
    """A ``response_headers`` message with ``:status``."""
    return pb.ProcessingRequest(
        response_headers=http_headers(
            [(":status", str(status)), *_items(headers)], end_of_stream=end_of_stream
        )
    )


def response_body(body: bytes, *, end_of_stream: bool = True) -> Any:
    """A ``response_body`` message."""
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


@dataclass
class Decoded:
    """A ``ProcessingResponse`` as plain Python.

    ``kind`` is the oneof set (``request_headers``, ..., ``immediate_response``);
    ``set_headers`` maps name -> value (decoded from ``raw_value``) of the options that
    overwrite, ``append_headers`` lists the appended ones (``append=true``); ``body`` is the body
    mutation or immediate body (None if absent); ``status`` is the immediate-response status;
    ``replace`` is True for CONTINUE_AND_REPLACE; ``modes`` holds the mode override (enum
    names) when one was sent.
    """

    kind: str
    set_headers: dict[str, str] = field(default_factory=dict)
    remove_headers: list[str] = field(default_factory=list)
    append_headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    status: int | None = None
    replace: bool = False
    modes: dict[str, str] | None = None
    raw: Any = None


def decode(reply: Any) -> Decoded:
    """Decode a ``ProcessingResponse``; asserts Envoy-compatible header options."""
    kind = reply.WhichOneof("response")
    out = Decoded(kind=kind or "", raw=reply)
    if reply.HasField("mode_override"):
        mode = reply.mode_override
        enums = processing_mode_pb2.ProcessingMode
        out.modes = {
            "request_body_mode": enums.BodySendMode.Name(mode.request_body_mode),
            "response_header_mode": enums.HeaderSendMode.Name(mode.response_header_mode),
            "response_body_mode": enums.BodySendMode.Name(mode.response_body_mode),
        }
    if kind == "immediate_response":
        imm = reply.immediate_response
        out.status = imm.status.code
        out.body = bytes(imm.body)
        _read_mutation(imm.headers, out)
        return out
    if kind is None:
        return out
    common = getattr(reply, kind).response
    _read_mutation(common.header_mutation, out)
    if common.HasField("body_mutation"):
        out.body = bytes(common.body_mutation.body)
    out.replace = common.status == pb.CommonResponse.CONTINUE_AND_REPLACE
    return out


def _read_mutation(mutation: Any, out: Decoded) -> None:
    for option in mutation.set_headers:
        assert not option.header.value, "Envoy ignores HeaderValue.value: use raw_value"
        value = option.header.raw_value.decode("utf-8")
        if option.append.value:  # one more header line (a repeated header)
            out.append_headers.append((option.header.key, value))
        else:
            out.set_headers[option.header.key] = value
    out.remove_headers.extend(mutation.remove_headers)


class ExtProcStream:
    """One ``Process`` stream: send a message, read the reply.

    ``send`` returns None once the server has ended the stream (as Envoy, the client then
    stops sending); :attr:`ended_by_server` tells that case apart. A stream the server ended
    with an error raises ``grpc.aio.AioRpcError`` from ``send``.
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self.ended_by_server = False

    async def send(self, message: Any) -> Any | None:
        """Write ``message`` and return the next reply, or None if the stream ended."""
        if self._call.done():
            self.ended_by_server = True
            return None
        try:
            await self._call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The server finished before this write; gRPC reports the lost write as INTERNAL.
            self.ended_by_server = True
            return None
        reply = await self._call.read()
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
            self.ended_by_server = True
            return None
        return reply

    async def finish(self) -> tuple[grpc.StatusCode, str]:
        """Half-close and return the final status code and details."""
        with contextlib.suppress(grpc.aio.UsageError):  # already finished
            await self._call.done_writing()
        code = await self._call.code()
        return code, await self._call.details()

    def cancel(self) -> None:
        """Reset the stream, as Envoy does at the end of a request."""
        self._call.cancel()


class ExtProcClient:
    """Async context manager: a grpc.aio channel to an ext_proc server at ``target``."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def __aenter__(self) -> ExtProcClient:
        self._channel = grpc.aio.insecure_channel(self._target)
        self._stub = pb_grpc.ExternalProcessorStub(self._channel)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if self._channel is not None:
            await self._channel.close(None)

    def open(self, route: str | None = None, *, timeout: float = 5.0) -> ExtProcStream:
        """Open a stream; ``route`` is sent as ``x-policy-route`` metadata like Envoy does."""
        metadata = ((ROUTE_METADATA_KEY, route),) if route is not None else ()
        return ExtProcStream(self._stub.Process(metadata=metadata, timeout=timeout))

    async def exchange(self, route: str | None, messages: Iterable[Any]) -> list[Any]:
        """Send ``messages`` one at a time on a new stream; return the replies received.

        Stops early when the server ends the stream. Raises ``grpc.aio.AioRpcError`` if the
        server ends the stream with an error, ``RuntimeError`` if it ends with a non-OK status
        after the last message.
        """
        stream = self.open(route)
        replies: list[Any] = []
        try:
            for message in messages:
                reply = await stream.send(message)
                if reply is None:
                    break
                replies.append(reply)
            if not stream.ended_by_server:
                code, details = await stream.finish()
                if code is not grpc.StatusCode.OK:
                    raise RuntimeError(f"stream ended with {code.name}: {details}")
        finally:
            stream.cancel()
        return replies


@contextlib.asynccontextmanager
async def serving(
    store: ConfigStore,
    processor: PolicyProcessor | None = None,
    *,
    grace: float = 0.5,
    within: float = 5.0,
    **options: Any,
) -> AsyncIterator[str]:
    """The engine's gRPC server (:func:`engine.transport.server.serve`) on a free
    127.0.0.1 port, in this event loop: yields its ``host:port`` once it serves, stops it
    on exit. ``within`` (seconds) bounds the start and the stop; ``options`` go to ``serve``."""
    ports: list[int] = []
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve(
            "127.0.0.1:0",
            store,
            grace=grace,
            ready=ready,
            stop=stop,
            on_bound=ports.append,
            processor=processor,
            **options,
        )
    )
    try:
        async with asyncio.timeout(within):
            await ready.wait()
        yield f"127.0.0.1:{ports[0]}"
    finally:
        stop.set()
        async with asyncio.timeout(within):
            await task
