"""The ext_proc stream machine: one HTTP request's ext_proc messages in, replies out.

Both transports drive it: the gRPC servicer (:mod:`engine.transport.grpc_service`) with every
message of one ``Process`` stream, the HTTP transport (:mod:`engine.transport.http_service`)
with the one message of each POST. :class:`StreamMachine` turns Envoy's messages into the
runtime's contexts (``engine.policy``), runs the route's chain (``engine.chain``,
``engine.streaming``) and turns its outcomes into replies (:mod:`engine.transport.messages`).
How a message travelled is not its concern: the gRPC context is only read for the route key.

Reading one request top-down::

    request_headers  -> route key -> ``store.current`` (taken ONCE) -> chain
                     -> run the request policies now, or ask Envoy to buffer the body
    request_body     -> (only if the chain needs it) run the request policies
    response_headers -> (only if the chain has a response phase) run the response policies now,
                        or wait for the buffered body
    response_body    -> (only if the chain needs it) run the response policies

Static routes
    A phase whose policies are all static and unconditional (``Chain.static_request_outcome``
    / ``static_response_outcome``, computed at config load) is answered with a reply built
    once per chain and shared (``_static_reply``): no context, no header conversion, no
    policy call. A chain static in both phases (``Chain.fully_static``) never builds a
    ``RequestContext``. Shared replies are never mutated (dynamic metadata goes into a copy).

Copy-on-write
    The snapshot is read once at ``request_headers``; the request and its response finish on
    that snapshot even if a hot reload swaps ``store.current`` meanwhile.

Processing modes
    Every reply to ``request_headers`` carries a ``mode_override`` that sets ALL of
    ``request_body_mode``, ``response_header_mode`` and ``response_body_mode`` (Envoy copies
    omitted body modes as NONE): request body BUFFERED only when the chain needs it and the
    request has one, response headers SEND only when the chain has a response phase, response
    body BUFFERED only when the chain needs it. Envoy must run with ``allow_mode_override: true``
    and a ``processing_mode`` of request/response headers SEND, bodies NONE.

    When the chain needs the request body, the header-only PREFIX of its request policies
    (``chain.request_head``) runs at ``request_headers``: an unauthenticated client is
    rejected before anything is buffered. The rest runs on the body. If the body never
    comes (Envoy ignored the override: ``request_trailers`` or ``response_headers`` arrive
    instead), the request is answered with the failure of the first body-reading policy
    (fail closed) instead of passing unpoliced.

    Bodies are policed whole. The filter's own body modes arrive in ``protocol_config``:
    NONE/BUFFERED -> ask BUFFERED (one message = the whole body). STREAMED -> ask STREAMED
    (so the mode is known whether or not Envoy honours the override): chunks are held back
    with ``clear_body`` until ``end_of_stream``, the policies see the whole body and the last
    reply carries it; header changes after such a body cannot reach Envoy and fail closed.
    BUFFERED_PARTIAL cut short (no ``end_of_stream``) -> 413: the rest would pass
    unprocessed. FULL_DUPLEX_STREAMED -> refused. Every body is bounded by ``max_body_bytes``.

Streamed bodies
    A phase whose body policies all have chunk hooks (``engine.streaming.streams``) is not
    buffered: its headers hooks run at the headers, the mode override asks Envoy for
    FULL_DUPLEX_STREAMED (:func:`engine.transport.messages.stream_modes`) and each piece
    goes through the stream's :class:`~engine.streaming.BodyStream`, one reply per piece
    (none for a piece after the end). The stream stays open while a request body still
    flows or after a policy ended the response body, so nothing passes unprocessed. A piece
    the policies made larger than ``max_body_bytes`` fails closed (500), as a buffered
    body does: its reply could exceed the gRPC message limit and fail the stream.

Mutations
    Headers are sent as ``HeaderValueOption{header{key, raw_value}, append=false}`` (Envoy
    ignores ``value`` and ``append_action``); an appended value is one more option with
    ``append=true``, so repeated headers (``set-cookie``) stay separate lines end to end,
    and headers no policy changed are not in the mutation at all. Path and method travel as
    ``:path``/``:method`` headers (``:method`` needs ``mutation_rules.allow_all_routing`` in
    Envoy), the response status as ``:status``. When request policies ran on a buffered
    body, their header changes ride in the ``BodyResponse`` and ``content-length`` is
    rewritten whenever the body changed (Envoy rejects a buffered body whose length differs
    from Content-Length). A body set by a policy on a phase whose body was not buffered is
    sent with ``CONTINUE_AND_REPLACE`` on the headers reply.

Errors
    A malformed or out-of-order message raises :class:`~engine.errors.ProtocolError` naming
    the problem; the transport ends THAT exchange with it (gRPC: ``INVALID_ARGUMENT``, HTTP:
    400), other requests are unaffected. A policy failure escaping the chain executor never
    kills the stream: the request is answered with a 500 (fail closed).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from engine import metrics, timing
from engine.chain import RequestState, count_static_runs, run_request, run_response
from engine.errors import PolicyError, ProtocolError
from engine.logformat import REQUEST_ID
from engine.policy import (
    ImmediateResponse,
    RequestContext,
    RequestMetadata,
    ResponseContext,
)
from engine.streaming import BodyStream, streams
from engine.transport import messages as msg

if TYPE_CHECKING:
    import grpc

    from engine.chain import Chain, ChainPolicy, RequestOutcome, ResponseOutcome
    from engine.transport.grpc_service import PolicyProcessor

_Outcome = TypeVar("_Outcome", "RequestOutcome", "ResponseOutcome")

__all__ = ["Phase", "StreamMachine"]

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """What the stream waits for next."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    DONE = "done"


class StreamMachine:
    """State of one HTTP request's ext_proc exchange: a whole gRPC ``Process`` stream, or
    over the HTTP transport one POST (one phase; the HTTP side sets :attr:`phase`,
    :attr:`route`, :attr:`chain` and :attr:`request` from the state it carried between
    phases).

    Feed it messages in order: :meth:`handle_streamed` (every message, streamed body pieces
    included) or :meth:`handle` (one message, one reply). :attr:`phase` says what comes
    next; :attr:`final` whether the reply just returned ends a phase (dynamic metadata
    rides on those); :attr:`streaming` whether a streamed body still needs the stream open.
    """

    __slots__ = (
        "_chunks",
        "_context",
        "_headers_only",
        "_processor",
        "_received",
        "chain",
        "cut",
        "final",
        "phase",
        "request",
        "request_mode",
        "request_stream",
        "response",
        "response_mode",
        "response_stream",
        "route",
        "streams_response",
    )

    def __init__(
        self,
        processor: PolicyProcessor,
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse] | None,
        *,
        headers_only: bool = False,
    ) -> None:
        # context: None over the HTTP transport (engine.transport.http_service): no
        # invocation metadata. headers_only: that transport carries no bodies, so a route
        # whose chain reads one is refused (never run with its body policies skipped).
        self._processor = processor
        self._context = context
        self._headers_only = headers_only
        self.phase = Phase.REQUEST_HEADERS
        self.route = ""
        self.chain: Chain | None = None
        self.request: RequestContext | None = None
        self.response: ResponseContext | None = None
        # The body modes asked for (see msg.body_mode); chunks of a STREAMED body so far.
        self.request_mode: int = msg.Mode.BUFFERED
        self.response_mode: int = msg.Mode.BUFFERED
        self._chunks: list[bytes] = []
        self._received = 0
        # Streamed bodies (engine/streaming.py): the pipelines of this stream, whether the
        # chain streams the response body, whether a policy ended the response body early,
        # and whether the reply being sent ends a phase (dynamic metadata rides on those).
        self.request_stream: BodyStream | None = None
        self.response_stream: BodyStream | None = None
        self.streams_response = False
        self.cut = False
        self.final = True

    @property
    def streaming(self) -> bool:
        """A streamed body still flows (or was cut by a policy while Envoy may still send
        pieces): the stream must stay open, or the rest would pass unprocessed."""
        request = self.request_stream
        return (request is not None and not request.ended) or self.cut

    async def handle_streamed(self, message: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """The replies to one message: what :meth:`handle` answers, or for a piece of a
        streamed body (engine/streaming.py) none (a piece after the end), one, or two
        (trailers ending a body the policies still held part of)."""
        if self.request_stream is not None or self.response_stream is not None:
            kind = message.WhichOneof("request") or ""
            replies = await self._streamed(kind, message)
            if replies is not None:
                self._processor.stats.messages[(self.route, kind)] += 1
                return replies
        return [await self.handle(message)]

    async def _streamed(
        self, kind: str, message: pb.ProcessingRequest
    ) -> list[pb.ProcessingResponse] | None:
        """The replies to a message that belongs to a streamed body; None: :meth:`handle`
        answers it."""
        request_stream, response_stream = self.request_stream, self.response_stream
        side = kind.partition("_")[0]
        stream = request_stream if side == "request" else response_stream
        if stream is not None and kind.endswith("_body"):
            reply = await self._on_chunk(side, getattr(message, kind))
            return [] if reply is None else [reply]
        if stream is not None and kind.endswith("_trailers"):
            return await self._on_stream_trailers(side)
        if (
            kind == "response_headers"
            and request_stream is not None
            and self.phase is Phase.REQUEST_BODY
        ):
            if not request_stream.received:
                return [self._body_never_came(kind)]
            # An early answer while the upload still streams: both go on.
            self.phase = Phase.RESPONSE_HEADERS
        return None

    async def handle(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """Reply to one message, advancing :attr:`phase`; raise ProtocolError when misplaced."""
        kind = message.WhichOneof("request")
        if kind is None:
            raise ProtocolError("ProcessingRequest has no request/response message set")
        phase = self.phase
        if kind != "request_headers":  # counted once its route is known
            self._processor.stats.messages[(self.route, kind)] += 1
        if kind == "request_headers":
            if phase is not Phase.REQUEST_HEADERS:
                raise ProtocolError("second request_headers on one stream")
            return await self._on_request_headers(message)
        if phase is Phase.REQUEST_HEADERS:
            raise ProtocolError(f"{kind} before request_headers")
        if kind == "request_body":
            if phase is Phase.REQUEST_BODY:
                return await self._on_request_body(message.request_body)
            # A chunk we did not ask for (e.g. a filter-level body mode): let it through.
            return pb.ProcessingResponse(request_body=pb.BodyResponse())
        if phase is Phase.REQUEST_BODY and kind in ("request_trailers", "response_headers"):
            if self._chunks:  # a STREAMED body ended by trailers: its chunks were held back
                return self._refuse("request", "a STREAMED request body with trailers")
            return self._body_never_came(kind)
        if kind == "request_trailers":
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        if kind == "response_headers":
            if phase is not Phase.RESPONSE_HEADERS:
                raise ProtocolError("second response_headers on one stream")
            return await self._on_response_headers(message.response_headers)
        if kind == "response_body":
            if phase is Phase.RESPONSE_BODY:
                return await self._on_response_body(message.response_body)
            if phase is not Phase.DONE and self.response is None:
                raise ProtocolError("response_body before response_headers")
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        if kind == "response_trailers":
            if phase is Phase.RESPONSE_BODY and self._chunks:
                return self._refuse("response", "a STREAMED response body with trailers")
            if self.response is None:
                raise ProtocolError("response_trailers before response_headers")
            return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        raise ProtocolError(f"unexpected ProcessingRequest message {kind!r}")

    # -- request phase -------------------------------------------------------------------

    async def _on_request_headers(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        http = message.request_headers
        self.route = msg.route_key(self._context, message, self._processor.route_names)
        chain, unknown = self._processor.chain_for(self.route)
        # Keys no chain has are counted together: they are the peer's words, and one
        # counter per key grew the processor's memory with every new one.
        counted = self.route if chain is not None else metrics.UNKNOWN_ROUTE
        self._processor.stats.messages[(counted, "request_headers")] += 1
        if chain is None:
            self.phase = Phase.DONE
            if unknown is not None:
                return msg.immediate(unknown)
            return msg.PASS_THROUGH_REPLY
        if self._headers_only and (chain.requires_request_body or chain.requires_response_body):
            return self._refuse_body_route()
        self.chain = chain
        if chain.fully_static:
            # Same answer for every request (computed at config load): no context needed.
            count_static_runs(chain, "request")
            self.phase = Phase.RESPONSE_HEADERS if chain.needs_response else Phase.DONE
            return _static_reply(chain, "request")
        headers, pseudo = msg.headers_from(http)
        request_id = headers.get("x-request-id", "")
        if request_id:  # log lines about this request carry it (--log-format json)
            REQUEST_ID.set(request_id)
        self.request = RequestContext(
            headers=headers,
            path=pseudo.get(":path", ""),
            method=pseudo.get(":method", ""),
            request_id=request_id,
            route=self.route,
            metadata=RequestMetadata(),
            client_address=msg.client_address(message),
        )
        config = message.protocol_config
        self.request_mode = msg.body_mode(config.request_body_mode)
        self.response_mode = msg.body_mode(config.response_body_mode)
        self.streams_response = chain.requires_response_body and streams(chain.policies, "response")
        if (chain.requires_request_body and self.request_mode == msg.Mode.FULL_DUPLEX_STREAMED) or (
            chain.requires_response_body and self.response_mode == msg.Mode.FULL_DUPLEX_STREAMED
        ):
            return self._refuse("request", "body mode FULL_DUPLEX_STREAMED in the filter config")
        if chain.requires_request_body and not http.end_of_stream:
            if config.send_body_without_waiting_for_header_response and (
                config.request_body_mode == msg.Mode.NONE
            ):
                # Envoy ignores every mode override in this setting: the body will never
                # come, so refuse now, before the request goes anywhere.
                return self._body_never_came("request_headers (send_body_without_waiting)")
            if streams(chain.policies, "request"):
                return await self._start_request_stream()
            return await self._run_request_head()
        mode = self._modes(request_body=False)
        self.phase = Phase.RESPONSE_HEADERS if chain.needs_response else Phase.DONE
        return await self._run_request(
            lambda outcome: pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(
                    response=msg.common_request(outcome, body_buffered=False)
                ),
                mode_override=mode,
            )
        )

    def _refuse_body_route(self) -> pb.ProcessingResponse:
        self.phase = Phase.DONE
        self._processor.stats.body_refusals += 1
        metrics.http_body_refusal(self.route)
        log.error(
            "route %r: its chain reads a body, which Envoy's HTTP ext_proc transport "
            "does not send: answering 500 (route it to the gRPC ext_proc filter)",
            self.route,
        )
        return msg.INTERNAL_ERROR_REPLY

    async def _run_request_head(self) -> pb.ProcessingResponse:
        """The chain needs the request body: run the header-only prefix now (it may reject
        the request before anything is buffered), then ask Envoy for the body."""
        assert self.request is not None
        assert self.chain is not None
        chain, request = self.chain, self.request
        state = RequestState.of(request)
        replaced = False

        async def head() -> RequestOutcome:
            nonlocal replaced
            outcome = await run_request(chain, request, policies=chain.request_head)
            if outcome.immediate is None and outcome.body is not None:
                # A header-only policy replaced the body: Envoy will not send the original
                # (CONTINUE_AND_REPLACE), so the rest runs now, on the new body.
                replaced = True
                return await run_request(chain, request, policies=chain.request_rest, since=state)
            return outcome

        def build(outcome: RequestOutcome) -> pb.ProcessingResponse:
            mode = self._modes(request_body=not replaced)
            if replaced:
                self.phase = Phase.RESPONSE_HEADERS if chain.needs_response else Phase.DONE
            common = msg.common_request(outcome, body_buffered=False)
            return pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(response=common), mode_override=mode
            )

        self.phase = Phase.REQUEST_BODY
        return await self._guarded("request", head(), build)

    async def _on_request_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        assert self.request is not None
        assert self.chain is not None
        data = self._whole_body("request", body, self.request_mode)
        if isinstance(data, pb.ProcessingResponse):
            return data
        self.request.body = data
        self.phase = Phase.RESPONSE_HEADERS if self.chain.needs_response else Phase.DONE
        if self.request_mode == msg.Mode.STREAMED:

            def build(outcome: RequestOutcome) -> pb.ProcessingResponse:
                changed = (
                    outcome.set_headers
                    or outcome.append_headers
                    or outcome.remove_headers
                    or outcome.path
                    or outcome.method
                )
                if changed:
                    return self._refuse("request", "a header change after a STREAMED body")
                common = msg.whole_body_mutation(outcome.body, data)
                return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

        else:

            def build(outcome: RequestOutcome) -> pb.ProcessingResponse:
                common = msg.common_request(outcome, body_buffered=True)
                return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

        return await self._run_request(build, self.chain.request_rest)

    def _whole_body(self, side: str, body: pb.HttpBody, mode: int) -> bytes | pb.ProcessingResponse:
        """The whole body once it is complete, else the reply to send now.

        BUFFERED: the one message is the whole body (``end_of_stream`` is false when trailers
        follow). STREAMED: chunks are held back (each answered with ``clear_body``) until the
        last one; the policies then see the whole body and the last reply carries it, so no
        byte reaches the other side before the policies ran. BUFFERED_PARTIAL without
        ``end_of_stream``: the body outgrew Envoy's buffer and the rest would pass
        unprocessed, so it is refused. Every mode is bounded by ``max_body_bytes``.
        """
        data = bytes(body.body)
        limit = self._processor.max_body_bytes
        if mode == msg.Mode.STREAMED:
            self._received += len(data)
            if self._received > limit:
                return self._too_large(side)
            if not body.end_of_stream:
                self._chunks.append(data)
                field = "request_body" if side == "request" else "response_body"
                return pb.ProcessingResponse(**{field: msg.HOLD_CHUNK})
            if self._chunks:
                data = b"".join([*self._chunks, data])
                self._chunks = []
        elif mode == msg.Mode.BUFFERED_PARTIAL and not body.end_of_stream:
            return self._too_large(side)
        if len(data) > limit:
            return self._too_large(side)
        return data

    def _too_large(self, side: str) -> pb.ProcessingResponse:
        self._processor.stats.too_large += 1
        limit = self._processor.max_body_bytes
        log.warning(
            "route %r: %s body larger than %d bytes (or than Envoy's buffer): refused",
            self.route,
            side,
            limit,
        )
        self.phase = Phase.DONE
        self._chunks = []
        return msg.immediate(msg.REQUEST_TOO_LARGE if side == "request" else msg.RESPONSE_TOO_LARGE)

    def _refuse(self, side: str, what: str) -> pb.ProcessingResponse:
        """Answer a setting the engine cannot police safely (fail closed, logged)."""
        log.error(
            "route %r: %s cannot be policed (use body modes NONE or BUFFERED in the ext_proc "
            "filter config): refusing the %s",
            self.route,
            what,
            side,
        )
        self.phase = Phase.DONE
        self._chunks = []
        failure = self.chain.body_failure if self.chain is not None else None
        if side == "request" and failure is not None:
            return msg.immediate(failure)
        return msg.INTERNAL_ERROR_REPLY

    def _modes(self, *, request_body: bool, request_stream: bool = False) -> Any:
        """The full mode override (every body mode set: omitted ones merge as NONE)."""
        assert self.chain is not None
        chain = self.chain
        if request_stream or self.streams_response:
            return msg.stream_modes(
                request_body=self.request_mode if request_body else msg.Mode.NONE,
                # A streamed request body also asks for the response headers: the response
                # then waits for the reply ending the request body (and its dynamic
                # metadata). Without it an upstream that answers once it has Content-Length
                # bytes completed the exchange before that reply arrived (seen in 1.36.4).
                response=chain.needs_response or request_stream,
                response_body=msg.Mode.FULL_DUPLEX_STREAMED
                if self.streams_response
                else (self.response_mode if chain.requires_response_body else msg.Mode.NONE),
                request_stream=request_stream,
            )
        return msg.modes(
            self.request_mode if request_body else msg.Mode.NONE,
            chain.needs_response,
            self.response_mode if chain.requires_response_body else msg.Mode.NONE,
        )

    def _body_never_came(self, kind: str) -> pb.ProcessingResponse:
        """``kind`` arrived where the request body the chain asked for should have: Envoy
        ignored the mode override, so the body-reading policies never ran. The request must
        not go on unpoliced: answer the failure of the first body-reading policy."""
        assert self.chain is not None
        assert self.chain.body_failure is not None
        self._processor.stats.missing_bodies += 1
        log.error(
            "route %r: %s arrived instead of the request body the chain needs; Envoy ignored "
            "the mode_override (needs allow_mode_override: true, a matching "
            "allowed_override_modes entry, no send_body_without_waiting_for_header_response): "
            "answering %d",
            self.route,
            kind,
            self.chain.body_failure.status,
        )
        self.phase = Phase.DONE
        return msg.immediate(self.chain.body_failure)

    async def _run_request(
        self,
        build: Callable[[RequestOutcome], pb.ProcessingResponse],
        policies: tuple[ChainPolicy, ...] | None = None,
    ) -> pb.ProcessingResponse:
        """Run the request policies (all, or ``policies``); the reply ``build`` makes of the
        outcome, or the response to send now."""
        assert self.request is not None
        assert self.chain is not None
        # run_request applies every change to the context in place, so self.request becomes
        # the request as sent upstream: the response phase sees it as ResponseContext.request.
        run = run_request(self.chain, self.request, policies=policies)
        return await self._guarded("request", run, build)

    # -- response phase ------------------------------------------------------------------

    async def _on_response_headers(self, http: pb.HttpHeaders) -> pb.ProcessingResponse:
        assert self.chain is not None
        if self.chain.static_response_outcome is not None:
            count_static_runs(self.chain, "response")
            self.phase = Phase.DONE
            return _static_reply(self.chain, "response")
        assert self.request is not None
        headers, pseudo = msg.headers_from(http)
        try:
            status = int(pseudo.get(":status", "0"))
        except ValueError:
            raise ProtocolError(
                f"response_headers with bad :status {pseudo[':status']!r}"
            ) from None
        self.response = ResponseContext(
            request=self.request, status=status, headers=headers, metadata=self.request.metadata
        )
        if self.streams_response and not http.end_of_stream:
            return await self._start_response_stream()
        if self.chain.requires_response_body and not http.end_of_stream:
            self.phase = Phase.RESPONSE_BODY
            self._received = 0
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        self.phase = Phase.DONE
        return await self._run_response(
            lambda outcome: pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(
                    response=msg.common_response(outcome, body_buffered=False)
                )
            )
        )

    async def _on_response_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        assert self.response is not None
        data = self._whole_body("response", body, self.response_mode)
        if isinstance(data, pb.ProcessingResponse):
            return data
        self.response.body = data
        self.phase = Phase.DONE
        if self.response_mode == msg.Mode.STREAMED:

            def build(outcome: ResponseOutcome) -> pb.ProcessingResponse:
                # The response headers went downstream before the first chunk.
                outcome = timing.without_header(outcome)
                if (
                    outcome.set_headers
                    or outcome.append_headers
                    or outcome.remove_headers
                    or outcome.status is not None
                ):
                    return self._refuse("response", "a header change after a STREAMED body")
                common = msg.whole_body_mutation(outcome.body, data)
                return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))

        else:

            def build(outcome: ResponseOutcome) -> pb.ProcessingResponse:
                common = msg.common_response(outcome, body_buffered=True)
                return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))

        return await self._run_response(build)

    async def _run_response(
        self, build: Callable[[ResponseOutcome], pb.ProcessingResponse]
    ) -> pb.ProcessingResponse:
        assert self.response is not None
        assert self.chain is not None
        return await self._guarded("response", run_response(self.chain, self.response), build)

    # -- streamed bodies (engine/streaming.py, engine/transport/messages.py) --------------

    async def _start_request_stream(self) -> pb.ProcessingResponse:
        """The request body streams: every request policy runs now, at the headers (body
        None); the reply asks Envoy for the body in FULL_DUPLEX_STREAMED."""
        assert self.request is not None
        assert self.chain is not None
        chain, request = self.chain, self.request

        def build(outcome: RequestOutcome) -> pb.ProcessingResponse:
            common = msg.common_request(outcome, body_buffered=False)
            if outcome.body is not None:  # replaced at the headers: the original never comes
                self.phase = Phase.RESPONSE_HEADERS if chain.needs_response else Phase.DONE
                mode = self._modes(request_body=False)
            else:
                started = BodyStream.start(
                    self.route, "request", chain.request_policies, request, timed=chain.timing
                )
                if isinstance(started, ImmediateResponse):
                    self.phase = Phase.DONE
                    return msg.immediate(started)
                self.request_stream = started
                self.phase = Phase.REQUEST_BODY
                mode = self._modes(request_body=False, request_stream=True)
            return pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(response=common), mode_override=mode
            )

        return await self._run_request(build)

    async def _start_response_stream(self) -> pb.ProcessingResponse:
        """The response body streams: the response policies run now, at the headers (body
        None); then each piece goes through the streaming policies."""
        assert self.response is not None
        assert self.chain is not None
        chain, response = self.chain, self.response

        def build(outcome: ResponseOutcome) -> pb.ProcessingResponse:
            common = msg.common_response(outcome, body_buffered=False)
            reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))
            if outcome.body is not None:  # replaced at the headers: the original never comes
                self.phase = Phase.DONE
                return reply
            started = BodyStream.start(
                self.route, "response", chain.response_policies, response, timed=chain.timing
            )
            if isinstance(started, ImmediateResponse):
                self.phase = Phase.DONE
                return msg.immediate(started)
            self.response_stream = started
            self.phase = Phase.RESPONSE_BODY
            return reply

        return await self._run_response(build)

    async def _on_chunk(self, side: str, body: pb.HttpBody) -> pb.ProcessingResponse | None:
        """One piece of a streamed body: what the policies send on (an empty body holds)."""
        stream = self.request_stream if side == "request" else self.response_stream
        assert stream is not None
        if stream.ended:
            # Nothing more goes on after the end: a piece after a policy ended the body, or
            # Envoy repeating the final piece (envoyproxy/envoy#46237). No reply expected.
            log.debug("route %r: %s body piece after its end: dropped", self.route, side)
            self._processor.stats.pieces_after_end += 1
            return None
        step = await stream.push(bytes(body.body), body.end_of_stream)
        if len(step.data) > self._processor.max_body_bytes:
            return self._piece_too_large(side, len(step.data))
        return self._chunk_step(side, step.data, step.end, step.immediate, body.end_of_stream)

    def _piece_too_large(self, side: str, size: int) -> pb.ProcessingResponse:
        """The policies made one piece larger than ``max_body_bytes``: its reply could
        exceed the gRPC message limit, which fails the whole stream (RESOURCE_EXHAUSTED;
        with ``failure_mode_allow`` Envoy would pass the rest of the body unprocessed).
        Fail closed, as a buffered body over the limit does (``_guarded``)."""
        self._processor.stats.policy_failures += 1
        log.error(
            "route %r: the %s body policies made a %d-byte piece, over max_body_bytes: "
            "failing closed",
            self.route,
            side,
            size,
        )
        self.phase = Phase.DONE
        self.request_stream = self.response_stream = None
        return msg.INTERNAL_ERROR_REPLY

    async def _on_stream_trailers(self, side: str) -> list[pb.ProcessingResponse]:
        """Trailers end a streamed body (no piece had ``end_of_stream``): flush the policies,
        send what they release, then let the trailers through."""
        stream = self.request_stream if side == "request" else self.response_stream
        assert stream is not None
        replies: list[pb.ProcessingResponse] = []
        if not stream.ended:
            step = await stream.push(b"", True)
            if len(step.data) > self._processor.max_body_bytes:
                return [self._piece_too_large(side, len(step.data))]
            reply = self._chunk_step(side, step.data, True, step.immediate, True)
            if step.immediate is not None:
                return [reply]
            if step.data:  # the body goes on before the trailers, which end it
                replies.append(msg.chunk_reply(side, step.data, False))
        self.final = True
        replies.append(msg.trailers_reply(side))
        return replies

    def _chunk_step(
        self,
        side: str,
        data: bytes,
        end: bool,
        immediate: ImmediateResponse | None,
        envoy_end: bool,
    ) -> pb.ProcessingResponse:
        if immediate is not None:
            # Fail closed (or a request policy's answer). Once the response headers went to
            # the client, Envoy resets the stream: an incomplete answer, never a cut one.
            self.phase = Phase.DONE
            self.request_stream = self.response_stream = None
            return msg.immediate(immediate)
        if end:
            if side == "request":
                if self.phase is Phase.REQUEST_BODY:
                    assert self.chain is not None
                    needs = self.chain.needs_response
                    self.phase = Phase.RESPONSE_HEADERS if needs else Phase.DONE
            else:
                self.phase = Phase.DONE
                self.cut = not envoy_end  # a policy ended it: Envoy may still send pieces
        self.final = end
        return msg.chunk_reply(side, data, end)

    async def _guarded(
        self,
        phase: str,
        run: Awaitable[_Outcome],
        build: Callable[[_Outcome], pb.ProcessingResponse],
    ) -> pb.ProcessingResponse:
        """The reply for one phase: ``build(outcome)``, the policies' own immediate
        response, or a 500 if the executor or the reply building failed.

        Building the reply is inside the guard: an outcome that cannot be turned into a
        message (a value that does not encode) must fail closed here, not escape
        ``Process`` (with ``failure_mode_allow`` Envoy would then drop the whole mutation,
        including the removal of a spoofed header).
        """
        try:
            outcome = await run
            if outcome.immediate is not None:
                self.phase = Phase.DONE
                return msg.immediate(outcome.immediate)
            if outcome.body is not None and len(outcome.body) > self._processor.max_body_bytes:
                # The reply could exceed the gRPC message limit and fail the whole stream.
                raise PolicyError(
                    f"a policy produced a {len(outcome.body)}-byte body, over max_body_bytes"
                )
            return build(outcome)
        except Exception:
            # The executor contains policy failures; reaching here is an engine bug. Fail closed.
            self._processor.stats.policy_failures += 1
            log.exception("%s chain failed for route %r", phase, self.route)
            self.phase = Phase.DONE
            return msg.INTERNAL_ERROR_REPLY


def _static_reply(chain: Chain, phase: str) -> pb.ProcessingResponse:
    """The reply to a static phase of ``chain`` (``chain.static_request_outcome`` /
    ``static_response_outcome``), built on first use and then shared: a few microseconds
    once per chain and worker instead of running the policies on every request."""
    reply = chain.replies.get(phase)
    if reply is None:
        if phase == "request":
            assert chain.static_request_outcome is not None
            common = msg.common_request(chain.static_request_outcome, body_buffered=False)
            mode = msg.modes(msg.Mode.NONE, chain.needs_response, msg.Mode.NONE)
            reply = pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(response=common), mode_override=mode
            )
        else:
            assert chain.static_response_outcome is not None
            common = msg.common_response(chain.static_response_outcome, body_buffered=False)
            reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))
        reply = chain.replies.setdefault(phase, reply)
    return reply
