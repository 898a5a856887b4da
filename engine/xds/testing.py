"""A raw ADS server for tests: it sends exactly the responses a test gives it.

Unlike the control plane it validates nothing, so a test can push what a buggy or
hostile xDS server would (invalid parameters, wrong type URLs, garbage bytes) and read
the engine's ACK/NACK requests back. Runs on the caller's event loop::

    server = RawXdsServer()
    port = await server.start()
    ... XdsConfigSource(f"127.0.0.1:{port}", ...) ...
    await server.push([], version="1", type_url=SETTINGS_TYPE)  # a version is a pair:
    await server.push([route_any("r", {"policies": []})], version="1")  # settings + routes
    ack = await server.next_request()
    await server.stop()

The engine answers a response only once it has both types of its version (see
:mod:`engine.xds.client`), so a test pushing one type alone gets no reply.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from engine.xds.resources import ROUTE_CHAIN_TYPE, encode_route

__all__ = ["RawXdsServer", "route_any"]

_CLOSE: Final = None


def route_any(key: str, spec: Mapping[str, Any]) -> any_pb2.Any:
    """``spec`` (a YAML route spec) as a packed ``RouteChain`` resource. No validation."""
    resource = any_pb2.Any()
    resource.Pack(encode_route(key, spec))
    return resource


@dataclass
class _Stream:
    outgoing: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = field(
        default_factory=asyncio.Queue
    )


class RawXdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """ADS on 127.0.0.1; :meth:`push` goes to the newest stream."""

    def __init__(self) -> None:
        # Requests per type URL: a test reads the verdicts of the type it pushes.
        self._requests: dict[str, asyncio.Queue[Any]] = {}
        self.streams: list[_Stream] = []
        self.opened = 0
        self._nonces = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._stream_ready = asyncio.Event()

    async def start(self, port: int = 0) -> int:
        self._server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        bound = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()
        return bound

    async def stop(self) -> None:
        for stream in self.streams:
            stream.outgoing.put_nowait(_CLOSE)
        self.streams.clear()
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = _Stream()
        self.streams.append(stream)
        self.opened += 1
        self._stream_ready.set()

        async def read() -> None:
            async for request in request_iterator:
                self._queue(request.type_url).put_nowait(request)

        reader = asyncio.create_task(read())
        try:
            while True:
                response = await stream.outgoing.get()
                if response is _CLOSE:
                    return
                yield response
        finally:
            reader.cancel()
            if stream in self.streams:
                self.streams.remove(stream)

    async def wait_for_stream(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Until a stream is open."""
        async with asyncio.timeout(timeout):
            while not self.streams:
                self._stream_ready.clear()
                await self._stream_ready.wait()

    async def push(
        self,
        resources: Sequence[any_pb2.Any],
        *,
        version: str,
        type_url: str = ROUTE_CHAIN_TYPE,
        nonce: str | None = None,
    ) -> discovery_pb2.DiscoveryResponse:
        """Send one response on the newest stream; returns it (with its nonce)."""
        await self.wait_for_stream()
        response = discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=list(resources),
            type_url=type_url,
            nonce=nonce if nonce is not None else f"n{next(self._nonces)}",
        )
        self.streams[-1].outgoing.put_nowait(response)
        return response

    def _queue(self, type_url: str) -> asyncio.Queue[Any]:
        return self._requests.setdefault(type_url, asyncio.Queue())

    async def next_request(
        self,
        timeout: float = 5.0,  # noqa: ASYNC109 - a plain bound reads best in tests
        *,
        type_url: str = ROUTE_CHAIN_TYPE,
    ) -> Any:
        """The next request of ``type_url`` any engine sent (subscription, ACK or NACK)."""
        async with asyncio.timeout(timeout):
            return await self._queue(type_url).get()

    def close_streams(self) -> None:
        """End every open stream (the server keeps listening): a control plane blip."""
        for stream in self.streams:
            stream.outgoing.put_nowait(_CLOSE)
