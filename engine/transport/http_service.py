"""Envoy's HTTP ext_proc transport (``http_service``): JSON messages <-> the ext_proc layer.

Envoy POSTs each ``ProcessingRequest`` as proto3 JSON (proto field names, header values
base64 in ``raw_value``) and applies the JSON ``ProcessingResponse`` it gets back. Only
header phases travel this way: Envoy sends no bodies or trailers over HTTP. Each message is
handled by the same stream state machine as over gRPC
(:class:`engine.transport.stream.StreamMachine`: route key -> snapshot -> chain -> reply), so
immediate responses, header mutations, mode overrides and dynamic metadata are the gRPC
path's, only re-encoded.

One POST per phase
    Over gRPC one stream holds the request's state between ``request_headers`` and
    ``response_headers``; over HTTP each phase is a separate POST (possibly to another
    worker or replica). What the response phase needs (route key, the request as sent
    upstream, the metadata the request policies wrote) therefore travels in the reply's
    dynamic metadata, namespace :data:`STATE_NAMESPACE`, which Envoy hands back in the
    ``response_headers`` message's ``metadata_context`` when the filter both receives and
    forwards that namespace (``metadata_options``). Clients cannot write it: dynamic
    metadata is set by Envoy filters only (here: this ext_proc filter, restricted by its
    ``receiving_namespaces``), never from request headers (checked end to end in
    tests/e2e/test_http_transport.py). Operators must not let another filter write that
    namespace. Credentials (``authorization``, ``proxy-authorization``, ``cookie``, and
    any header holding a secret parameter of the chain, e.g. apiKey's key with
    ``stripKey: false``) are left out of the carried request headers, and such a secret in
    the path is replaced by ``<redacted>``, so that they never sit in dynamic metadata
    (access logs can print it): a response policy over HTTP does not see them. A
    ``response_headers`` message without valid state is answered 500 (fail closed).
    The response phase runs the route's chain of the CURRENT snapshot (gRPC keeps the
    request's snapshot).

Bodies
    A route whose chain reads a body cannot be policed over HTTP: its request is answered
    500 at once (logged with the route, counted in ``policy_engine_http_body_refusals_total``),
    never passed with its body policies skipped. Route such routes to the gRPC filter
    (docs/operators/http-transport.md).

Route key
    The ``xds.route_name`` request attribute (``request_attributes: [xds.route_name]``).
    Envoy 1.36.4 sends no per-route ``grpc_initial_metadata`` over HTTP, and does not add
    ``http_service.request_headers_to_add`` to its POSTs either.

Errors
    Malformed JSON or an out-of-order message -> HTTP 400 (Envoy then fails the request
    closed, or passes it with ``failure_mode_allow``), as gRPC aborts the stream.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

import msgspec
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from engine import metrics
from engine.chain import count_static_runs
from engine.errors import ProtocolError
from engine.policy import Headers, RequestContext, RequestMetadata
from engine.secrets import MIN_BARE_SCRUB, scrub
from engine.transport import messages as msg
from engine.transport.grpc_service import PolicyProcessor
from engine.transport.stream import Phase, StreamMachine

__all__ = ["STATE_NAMESPACE", "HttpExtProc", "to_json"]

log = logging.getLogger(__name__)

STATE_NAMESPACE: Final = "policy_engine.http_state"
"""Dynamic metadata namespace carrying a request's state from its request phase to its
response phase (``metadata_options`` receiving AND forwarding it)."""

_STATE_KEY: Final = "s"
_MAX_ROUTE_STATES: Final = 4096
_STATE_VERSION: Final = 1
_NOT_CARRIED: Final = frozenset({"authorization", "proxy-authorization", "cookie"})


# -- the JSON ProcessingRequest (only what the engine reads) ---------------------------
#
# Decoded straight into msgspec structs shaped like the protobuf messages the stream machine
# reads (``headers.headers[].key/raw_value/value``, ``end_of_stream``, ``attributes[...]
# .fields[...].string_value``, ``protocol_config.*``, ``WhichOneof``): building real
# protobuf messages cost ~12 us of a ~27 us request phase (tools/bench/http_transport.py).


class _HeaderValue(msgspec.Struct):
    key: str = ""
    value: str = ""
    raw_value: bytes = b""  # base64 in JSON: msgspec decodes it


class _HeaderMap(msgspec.Struct):
    headers: list[_HeaderValue] = []


class _HttpHeaders(msgspec.Struct):
    headers: _HeaderMap = msgspec.field(default_factory=_HeaderMap)
    end_of_stream: bool = False


class _ProtocolConfig(msgspec.Struct):
    request_body_mode: str | int = 0
    response_body_mode: str | int = 0
    send_body_without_waiting_for_header_response: bool = False


class _Metadata(msgspec.Struct):
    filter_metadata: dict[str, dict[str, Any]] = {}


class _Request(msgspec.Struct):
    request_headers: _HttpHeaders | None = None
    response_headers: _HttpHeaders | None = None
    request_body: dict[str, Any] | None = None
    response_body: dict[str, Any] | None = None
    request_trailers: dict[str, Any] | None = None
    response_trailers: dict[str, Any] | None = None
    attributes: dict[str, dict[str, Any]] = {}
    metadata_context: _Metadata | None = None
    protocol_config: _ProtocolConfig = msgspec.field(default_factory=_ProtocolConfig)


_DECODER: Final = msgspec.json.Decoder(_Request)
_ENCODER: Final = msgspec.json.Encoder()
_STATE_ENCODER: Final = msgspec.msgpack.Encoder()
_STATE_DECODER: Final = msgspec.msgpack.Decoder(dict[str, Any])


class _Value:
    """A ``google.protobuf.Value`` as the stream machine reads it (``string_value``)."""

    __slots__ = ("string_value",)

    def __init__(self, value: Any) -> None:
        self.string_value = value if isinstance(value, str) else ""


class _Fields(dict[str, Any]):
    """``Struct.fields``: each value wrapped as a :class:`_Value` when it is read (most
    requests read one or two of them)."""

    __slots__ = ()

    def __getitem__(self, name: str) -> _Value:
        return _Value(dict.__getitem__(self, name))


class _Struct:
    """A ``google.protobuf.Struct`` as the stream machine reads it (``fields``)."""

    __slots__ = ("fields",)

    def __init__(self, values: dict[str, Any]) -> None:
        self.fields = _Fields(values)


class _Modes:
    __slots__ = (
        "request_body_mode",
        "response_body_mode",
        "send_body_without_waiting_for_header_response",
    )

    def __init__(self, config: _ProtocolConfig) -> None:
        self.request_body_mode = _mode(config.request_body_mode)
        self.response_body_mode = _mode(config.response_body_mode)
        self.send_body_without_waiting_for_header_response = (
            config.send_body_without_waiting_for_header_response
        )


class _Message:
    """A ``ProcessingRequest`` as the stream machine reads it (header messages only)."""

    __slots__ = ("attributes", "kind", "protocol_config", "request_headers", "response_headers")

    def __init__(self, request: _Request) -> None:
        if request.request_headers is not None:
            self.kind = "request_headers"
        elif request.response_headers is not None:
            self.kind = "response_headers"
        else:
            for kind in ("request_body", "response_body", "request_trailers", "response_trailers"):
                if getattr(request, kind) is not None:
                    raise ProtocolError(
                        f"{kind} over the HTTP transport (Envoy sends headers only)"
                    )
            raise ProtocolError("ProcessingRequest has no request/response message set")
        self.request_headers = request.request_headers
        self.response_headers = request.response_headers
        attributes = request.attributes.get(msg.ATTRIBUTES_KEY)
        self.attributes = {msg.ATTRIBUTES_KEY: _Struct(attributes)} if attributes else {}
        # Envoy sends protocol_config with the first message only; the stream machine
        # reads it there.
        if self.kind == "request_headers":
            self.protocol_config = _Modes(request.protocol_config)
        else:
            self.protocol_config = _NO_MODES

    def WhichOneof(self, _group: str) -> str:
        return self.kind


_BODY_MODES: Final[dict[str, int]] = dict(msg.Mode.BodySendMode.items())


def _mode(value: str | int) -> int:
    if isinstance(value, int):
        return value
    found = _BODY_MODES.get(value)
    if found is None:
        raise ProtocolError(f"unknown body mode {value!r}")
    return found


_NO_MODES: Final = _Modes(_ProtocolConfig())


# -- ProcessingResponse -> JSON ----------------------------------------------------------

_WRAPPERS: Final = frozenset(
    {"google.protobuf.BoolValue", "google.protobuf.UInt32Value", "google.protobuf.StringValue"}
)
_STRUCTS: Final = frozenset({"google.protobuf.Struct", "google.protobuf.Value"})


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _wrapped(value: Any) -> Any:
    return value.value


def _same(value: Any) -> Any:
    return value


def _converter(fd: FieldDescriptor) -> Callable[[Any], Any]:
    """How one field's (single) value becomes JSON, decided once per field descriptor."""
    kind = fd.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        assert fd.message_type is not None
        name = fd.message_type.full_name
        if name in _WRAPPERS:
            return _wrapped
        if name in _STRUCTS:
            return json_format.MessageToDict
        return to_json
    if kind == FieldDescriptor.TYPE_BYTES:
        return _b64
    if kind == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        names = {number: value.name for number, value in fd.enum_type.values_by_number.items()}
        return names.__getitem__
    return _same


_FIELDS: dict[FieldDescriptor, tuple[str, bool, Callable[[Any], Any]]] = {}
"""Per field descriptor: its JSON name, whether it is repeated, its converter (the replies
use a few dozen fields; reading the descriptors on every reply cost more than the rest)."""


def to_json(message: Any) -> dict[str, Any]:
    """``message`` in the proto3 JSON mapping (proto field names), as Envoy parses it.
    Covers what ``engine.transport.messages`` builds (no maps, no 64-bit integers)."""
    out: dict[str, Any] = {}
    for fd, value in message.ListFields():
        field = _FIELDS.get(fd)
        if field is None:
            field = _FIELDS[fd] = (fd.name, fd.is_repeated, _converter(fd))
        name, repeated, convert = field
        out[name] = [convert(item) for item in value] if repeated else convert(value)
    return out


_EMPTY_RESPONSE_HEADERS: Final = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_SHARED: Final = {
    id(reply): to_json(reply)
    for reply in (msg.PASS_THROUGH_REPLY, msg.INTERNAL_ERROR_REPLY, _EMPTY_RESPONSE_HEADERS)
}


def _reply_json(reply: pb.ProcessingResponse) -> dict[str, Any]:
    """``reply`` as JSON; the module's shared replies are converted once (never mutated:
    callers copy before adding). A static chain's answer is kept whole, as bytes, by
    :meth:`HttpExtProc._encode`."""
    shared = _SHARED.get(id(reply))
    return shared if shared is not None else to_json(reply)


def _answer_key(phase: str, route: str) -> tuple[str, str, str]:
    """Where a static phase's encoded answer is kept in its chain's ``replies``."""
    return ("http-answer", phase, route)


# -- carried state -------------------------------------------------------------------------


def _state(stream: StreamMachine) -> str:
    request = stream.request
    state: dict[str, Any] = {"v": _STATE_VERSION, "route": stream.route}
    if request is not None:
        headers = request.headers
        carried = {n: headers.get_all(n) for n in headers if n not in _NOT_CARRIED}
        path = request.path
        secrets = stream.chain.secrets if stream.chain is not None else ()
        if secrets:  # e.g. apiKey's key in its header or query (stripKey: false)
            carried = {n: values for n, values in carried.items() if not _holds(values, secrets)}
            path = scrub(path, secrets)
        state["request"] = {
            "headers": carried,
            "path": path,
            "method": request.method,
            "id": request.request_id,
            "client": request.client_address,
            "metadata": dict(request.metadata),
        }
    return base64.b64encode(_STATE_ENCODER.encode(state)).decode("ascii")


def _holds(values: list[str], secrets: frozenset[str]) -> bool:
    """Whether a header's values hold a secret: one whole, or inside from
    :data:`~engine.secrets.MIN_BARE_SCRUB` characters on (as :func:`scrub` finds them)."""
    return any(
        value == secret or (len(secret) >= MIN_BARE_SCRUB and secret in value)
        for value in values
        for secret in secrets
    )


def _state_text(request: _Request) -> str | None:
    """The carried state the message brings back (its ``metadata_context``), if any."""
    carried = request.metadata_context
    namespace = carried.filter_metadata.get(STATE_NAMESPACE) if carried is not None else None
    text = namespace.get(_STATE_KEY) if namespace else None
    return text if isinstance(text, str) else None


def _decode_state(text: str) -> dict[str, Any]:
    """The state the request phase left, or raise ``ValueError`` naming what is wrong."""
    try:
        state = _STATE_DECODER.decode(base64.b64decode(text, validate=True))
    except (binascii.Error, msgspec.DecodeError) as exc:
        raise ValueError(f"malformed {STATE_NAMESPACE} metadata") from exc
    if state.get("v") != _STATE_VERSION or not isinstance(state.get("route"), str):
        raise ValueError(f"malformed {STATE_NAMESPACE} metadata")
    return state


def _request_from(route: str, carried: dict[str, Any]) -> RequestContext:
    raw_headers = carried["headers"]
    values = {str(k): [str(v) for v in vs] for k, vs in raw_headers.items()}
    return RequestContext(
        headers=Headers.adopt(values),
        path=str(carried["path"]),
        method=str(carried["method"]),
        request_id=str(carried["id"]),
        route=route,
        metadata=RequestMetadata(dict(carried["metadata"])),
        client_address=str(carried["client"]),
    )


class HttpExtProc:
    """The HTTP transport's handler: one POST = one ext_proc message (see the module
    docstring). Shares the gRPC processor (its store, limits, stats and Envoy metadata)."""

    def __init__(self, processor: PolicyProcessor) -> None:
        self.processor = processor
        # Decoded route-only states (static chains: one per route), bounded.
        self._route_states: dict[str, dict[str, Any]] = {}

    def _restore(self, request: _Request) -> dict[str, Any]:
        text = _state_text(request)
        if text is None:
            raise ValueError(
                f"no {STATE_NAMESPACE} metadata (the filter must receive and forward that "
                "namespace: metadata_options)"
            )
        state = self._route_states.get(text)
        if state is None:
            state = _decode_state(text)
            if "request" not in state:
                if len(self._route_states) >= _MAX_ROUTE_STATES:
                    self._route_states.clear()
                self._route_states[text] = state
        return state

    def __call__(
        self, path: str, body: bytes
    ) -> tuple[int, bytes] | Coroutine[Any, Any, tuple[int, bytes]]:
        """``(HTTP status, JSON body)`` answering one POSTed ``ProcessingRequest``: at once
        for a malformed message or a static phase's kept answer, else a coroutine that runs
        the stream machine (the HTTP server runs it in a task: policies may use anything
        asyncio offers, ``asyncio.timeout`` included)."""
        try:
            request = _DECODER.decode(body)
            answer = self._static_answer(request)
            if answer is not None:
                return 200, answer
            message = _Message(request)
        except (msgspec.DecodeError, ProtocolError) as exc:
            return self._protocol_error(exc)
        return self._handle(message, request)

    async def _handle(self, message: _Message, request: _Request) -> tuple[int, bytes]:
        kind = message.kind
        try:
            if kind == "request_headers":
                reply, stream = await self._request_headers(message)
            else:
                reply, stream = await self._response_headers(message, request)
        except ProtocolError as exc:
            return self._protocol_error(exc)
        if stream is None:
            return 200, _ENCODER.encode(_reply_json(reply))
        return 200, self._encode(kind, reply, stream)

    def _protocol_error(self, exc: Exception) -> tuple[int, bytes]:
        self.processor.stats.protocol_errors += 1
        metrics.extproc_protocol_error()
        log.warning("HTTP ext_proc protocol error: %s", exc)
        return 400, _ENCODER.encode({"error": str(exc)})

    def _encode(self, kind: str, reply: pb.ProcessingResponse, stream: StreamMachine) -> bytes:
        """The answer's bytes: the reply, Envoy metadata and (request phase) the state.

        A static phase without request context (no metadata, the state is just the route)
        has the same answer for every request of its route: built once, kept on the chain."""
        phase = kind.partition("_")[0]
        chain = stream.chain
        key = None
        if chain is not None and stream.request is None and chain.replies.get(phase) is reply:
            key = _answer_key(phase, stream.route)
            cached = chain.replies.get(key)
            if cached is not None:
                return cached  # type: ignore[no-any-return]
        encoded = _reply_json(reply)
        extra: dict[str, Any] = {}
        emit = self.processor.envoy_metadata
        if emit is not None and stream.request is not None:
            fields = emit.fields(stream.request.metadata)
            if fields:
                extra[emit.namespace] = fields
        if kind == "request_headers" and stream.phase is Phase.RESPONSE_HEADERS:
            extra[STATE_NAMESPACE] = {_STATE_KEY: _state(stream)}
        if extra:
            encoded = {
                **encoded,
                "dynamic_metadata": {**encoded.get("dynamic_metadata", {}), **extra},
            }
        data = _ENCODER.encode(encoded)
        if key is not None and chain is not None:
            chain.replies.setdefault(key, data)
        return data

    def _static_answer(self, request: _Request) -> bytes | None:
        """The answer :meth:`_encode` kept for a static phase of the message's route, else
        None (the stream machine handles the message).

        Such a phase has one answer for every request of its route in a snapshot, and the
        machine would only count the message and return it: so does this, without building
        the machine (in-process, a 5-header static request phase costs ~13 k instructions
        more than the transport's floor this way, ~38 k through the machine). Chains are per
        snapshot, so a new configuration starts without kept answers. The body modes are
        checked as on the machine's path."""
        processor = self.processor
        if request.request_headers is not None:
            attributes = request.attributes.get(msg.ATTRIBUTES_KEY)
            name = attributes.get(msg.ROUTE_ATTRIBUTE) if attributes else None
            if not isinstance(name, str) or not name:
                return None
            route = name if processor.route_names is None else processor.route_names.key(name)
            chain = processor.store.current.chain_for(route)
            answer = chain.replies.get(_answer_key("request", route)) if chain else None
            if chain is None or answer is None:
                return None
            _Modes(request.protocol_config)  # raises ProtocolError for an unknown mode
            processor.stats.streams += 1
            processor.stats.messages[(route, "request_headers")] += 1
            metrics.stream(route, has_chain=True)
            count_static_runs(chain, "request")
            return answer  # type: ignore[no-any-return]
        if request.response_headers is not None:
            text = _state_text(request)
            state = self._route_states.get(text) if text is not None else None
            route = state["route"] if state is not None else ""
            chain = processor.store.current.chain_for(route) if route else None
            answer = chain.replies.get(_answer_key("response", route)) if chain else None
            if chain is None or answer is None:
                return None
            processor.stats.messages[(route, "response_headers")] += 1
            count_static_runs(chain, "response")
            return answer  # type: ignore[no-any-return]
        return None

    async def _request_headers(
        self, message: Any
    ) -> tuple[pb.ProcessingResponse, StreamMachine | None]:
        self.processor.stats.streams += 1
        stream = StreamMachine(self.processor, None, headers_only=True)
        return await stream.handle(message), stream

    async def _response_headers(
        self, message: Any, request: _Request
    ) -> tuple[pb.ProcessingResponse, StreamMachine | None]:
        processor = self.processor
        try:
            state = self._restore(request)
            route = state["route"]
            chain = processor.store.current.chain_for(route) if route else None
            if chain is None or not chain.needs_response:
                # The configuration changed between the phases: nothing to run now.
                return _EMPTY_RESPONSE_HEADERS, None
            stream = StreamMachine(processor, None)
            stream.route = route
            stream.chain = chain
            if chain.static_response_outcome is None:
                carried = state.get("request")
                if not isinstance(carried, dict):
                    raise ValueError("the route's response phase needs the request, not carried")
                stream.request = _request_from(route, carried)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            processor.stats.state_failures += 1
            log.error("HTTP ext_proc response_headers: %s: answering 500", exc)
            return msg.INTERNAL_ERROR_REPLY, None
        stream.phase = Phase.RESPONSE_HEADERS
        return await stream.handle(message), stream
