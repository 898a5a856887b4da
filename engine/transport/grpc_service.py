"""The Envoy ext_proc gRPC service: one ``Process`` stream = one HTTP request.

:class:`PolicyProcessor` is the ``ExternalProcessor`` servicer. Each ``Process`` stream gets
one :class:`~engine.transport.stream.StreamMachine` (what each message means, the processing
modes, the mutations: :mod:`engine.transport.stream`); the servicer feeds it every message,
sends its replies back (the request's dynamic metadata on the reply that ends a phase) and
ends the stream once nothing more is needed. The processor also holds what every exchange of
either transport shares: the store, the body limit, the route-name pattern, the Envoy
metadata selection and the counters (the HTTP transport wraps the same processor).

How the route is found
    Each Envoy route carries ``ExtProcPerRoute.overrides.grpc_initial_metadata``
    ``{key: x-policy-route, value: <route key>}``; Envoy merges per-route config before it
    opens the stream, so the key arrives in the gRPC invocation metadata of ``Process``. This
    is the most robust mechanism (it needs no attributes, no CEL and no metadata parsing). As a
    fallback the ``xds.route_name`` request attribute is used when Envoy sends it
    (``request_attributes: [xds.route_name]``), turned into a key by ``route_names`` when
    the route names are generated (Envoy Gateway, Istio: ``engine.route_names``). A request
    whose key is missing or unknown to the current snapshot gets the snapshot's
    ``unknownRoute`` answer: by default a 404 (fail closed: a missing chain is a deployment
    mismatch, and passing would run the request with no policy at all), or pass-through
    with ``unknownRoute: {action: allow}``. A warning is logged once per key (for up to
    1024 keys, then debug). The empty chain of a KNOWN route passes through.

Errors
    A malformed or out-of-order message aborts THAT stream with ``INVALID_ARGUMENT`` naming
    the problem; other streams are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from engine import metrics
from engine.envoy_metadata import EnvoyMetadata
from engine.errors import ProtocolError
from engine.policy import ImmediateResponse
from engine.transport.messages import (
    ATTRIBUTES_KEY,
    DEFAULT_MAX_BODY_BYTES,
    ROUTE_ATTRIBUTE,
    ROUTE_METADATA_KEY,
)
from engine.transport.stream import Phase, StreamMachine

if TYPE_CHECKING:
    from engine.chain import Chain
    from engine.route_names import RouteNamePattern
    from engine.store import ConfigStore

__all__ = [
    "ATTRIBUTES_KEY",
    "DEFAULT_MAX_BODY_BYTES",
    "ROUTE_ATTRIBUTE",
    "ROUTE_METADATA_KEY",
    "PolicyProcessor",
    "ProcessorStats",
]

log = logging.getLogger(__name__)

_MAX_WARNED_ROUTES: Final = 1024


@dataclass(slots=True)
class ProcessorStats:
    """Counters of one :class:`PolicyProcessor` (for tests and debugging; not thread-safe).

    ``messages`` counts received messages by ``(route key, message kind)``; the route key is
    ``""`` for messages that arrive before the route is known, and
    ``engine.metrics.UNKNOWN_ROUTE`` for streams whose key no chain has (any key a peer
    sends would otherwise add a counter for good).
    """

    streams: int = 0
    messages: Counter[tuple[str, str]] = field(default_factory=Counter)
    protocol_errors: int = 0
    unknown_routes: int = 0
    policy_failures: int = 0
    missing_bodies: int = 0
    too_large: int = 0
    pieces_after_end: int = 0
    """Streamed body pieces that came after their body had ended (a policy's end, or Envoy
    repeating the final piece: envoyproxy/envoy#46237); dropped, never sent on."""
    body_refusals: int = 0
    """Requests over the HTTP transport whose chain reads a body (answered 500)."""
    state_failures: int = 0
    """HTTP transport ``response_headers`` without valid carried state (answered 500)."""
    unpoliced_responses: int = 0
    """Streams that ended while the chain waited for the response body: its response
    policies never ran (an upstream answer of headers and trailers without data, which
    Envoy sends the engine neither of, or a peer that hung up)."""

    def count(self, kind: str, route: str | None = None) -> int:
        """Messages of ``kind`` received, for one route or (``route=None``) all routes."""
        if route is not None:
            return self.messages[(route, kind)]
        return sum(n for (_, k), n in self.messages.items() if k == kind)


class PolicyProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """``envoy.service.ext_proc.v3.ExternalProcessor`` running per-route policy chains.

    ``store.current`` is read once per stream (at ``request_headers``). The processor keeps no
    per-request state outside the stream, so one instance serves all concurrent streams.

    Streams in flight
        A ``Process`` stream counts as in flight from its first message until gRPC has
        finished it (its final status sent: the context's done callback), so
        :meth:`wait_idle` returning means every stream's status is already on its connection.
        The server's stop sequence relies on that (see ``engine.transport.server.serve``).
    """

    def __init__(
        self,
        store: ConfigStore,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        envoy_metadata: EnvoyMetadata | None = None,
        route_names: RouteNamePattern | None = None,
    ) -> None:
        self._store = store
        self._warned_routes: set[str] = set()
        self.max_body_bytes = max_body_bytes
        self.stats = ProcessorStats()
        # Which request metadata Envoy receives as dynamic metadata (None: none).
        self.envoy_metadata = envoy_metadata
        # How an xds.route_name attribute becomes a chain key (None: the name is the key).
        self.route_names = route_names
        self._in_flight = 0
        # Futures (created on the waiting loop: a processor is not bound to one loop)
        # resolved when _in_flight drops to 0.
        self._idle_waiters: list[asyncio.Future[None]] = []

    @property
    def store(self) -> ConfigStore:
        """Where every exchange takes its snapshot (``store.current``, read once per request)."""
        return self._store

    @property
    def streams_in_flight(self) -> int:
        """``Process`` streams started and not yet finished by gRPC (status not yet sent)."""
        return self._in_flight

    async def wait_idle(self) -> None:
        """Return once no ``Process`` stream is in flight (at once if none is). New streams
        may start again afterwards: the caller decides what idle is worth (the server's stop
        sequence calls it before it sends GOAWAY)."""
        while self._in_flight:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _stream_finished(self, _context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():  # a waiter whose wait was cancelled (timeout)
                    waiter.set_result(None)

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Handle one HTTP request; the stream ends (OK) as soon as nothing more is needed."""
        self.stats.streams += 1
        # gRPC calls this once the RPC is over, final status sent, whichever way it ended
        # (returned, aborted, cancelled by the peer); the end of this generator comes earlier.
        # (grpc-stubs declare the callback as a class, not a Protocol: no function matches.)
        context.add_done_callback(self._stream_finished)  # type: ignore[arg-type]
        self._in_flight += 1
        stream = StreamMachine(self, context)
        emit = self.envoy_metadata
        try:
            async for request in request_iterator:
                stream.final = True
                for reply in await stream.handle_streamed(request):
                    if emit is not None and stream.request is not None and stream.final:
                        yield emit.attach(reply, stream.request.metadata)
                    else:
                        yield reply
                if stream.phase is Phase.DONE and not stream.streaming:
                    return
            if stream.phase is Phase.REQUEST_BODY:
                self.stats.missing_bodies += 1
                log.error(
                    "route %r: the stream ended before the request body the chain needs; "
                    "check that Envoy honours the mode_override (allow_mode_override: true)",
                    stream.route,
                )
            elif stream.phase is Phase.RESPONSE_BODY:
                self.stats.unpoliced_responses += 1
                log.warning(
                    "route %r: the stream ended before the response body the chain reads: "
                    "its response policies did not run (an upstream answer of headers and "
                    "trailers without data reaches the client so; or the client hung up)",
                    stream.route,
                )
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            metrics.extproc_protocol_error()
            log.warning("ext_proc protocol error (route %r): %s", stream.route, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def chain_for(self, route: str) -> tuple[Chain | None, ImmediateResponse | None]:
        """The route's chain in the current snapshot, or (None, the unknownRoute answer;
        None = pass through). Counts the stream (metrics) and warns once per unknown key."""
        snapshot = self._store.current
        chain = snapshot.chain_for(route) if route else None
        metrics.stream(route, has_chain=chain is not None)
        if chain is not None:
            return chain, None
        answer = snapshot.unknown_route
        self.stats.unknown_routes += 1
        if route not in self._warned_routes and len(self._warned_routes) < _MAX_WARNED_ROUTES:
            self._warned_routes.add(route)
            what = "passing requests through" if answer is None else f"answering {answer.status}"
            log.warning("no policy chain for route key %r: %s (unknownRoute)", route, what)
        else:
            log.debug("no policy chain for route key %r", route)
        return None, answer
