"""Pure helpers of the ext_proc layer: reading Envoy's messages and building replies.

:mod:`engine.transport.stream` holds the stream state machine; everything here is a
function of its arguments (or a reply built once at import), so one request's path reads:
message in -> :func:`headers_from` / :func:`route_key` -> chain -> :func:`common_request` /
:func:`common_response` / :func:`immediate` -> message out.

Streamed bodies (checked against Envoy 1.36.4, tests/e2e/test_streaming.py)
    :func:`stream_modes` asks Envoy for ``FULL_DUPLEX_STREAMED``; :func:`chunk_reply` and
    :func:`trailers_reply` carry the policies' output.

    The filter is configured as for buffered bodies (headers SEND, bodies NONE,
    ``allow_mode_override: true``). For a chain whose phase streams
    (:func:`engine.streaming.streams`), the reply to ``request_headers`` carries a
    ``mode_override`` with that side's body mode ``FULL_DUPLEX_STREAMED`` and its trailer mode
    ``SEND`` (Envoy requires trailers SEND with that body mode). Envoy then sends every body
    piece as it arrives and each reply's ``body_mutation.streamed_response`` ``{body,
    end_of_stream}`` is what goes on: an empty body holds, ``end_of_stream`` ends the body
    (also when a policy ends it early: the client sees a complete response, Envoy resets
    the upstream). There is no per-message timer in this mode (``message_timeout`` does not
    apply to body pieces). ``Content-Length`` is dropped by Envoy (HTTP/1 goes chunked).

    Envoy ignores a mode override when the filter's own body mode is
    ``FULL_DUPLEX_STREAMED``, with ``send_body_without_waiting_for_header_response``, or when
    ``allowed_override_modes`` lists no entry equal to it: the engine refuses the first two
    up front and fails closed when a body it asked for does not come (docs/operators/envoy.md
    lists the entries to allow).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import wrappers_pb2

from engine.policy import Headers, ImmediateResponse

if TYPE_CHECKING:
    from engine.chain import RequestOutcome, ResponseOutcome
    from engine.route_names import RouteNamePattern

__all__ = [
    "ATTRIBUTES_KEY",
    "CLIENT_ADDRESS_ATTRIBUTE",
    "DEFAULT_MAX_BODY_BYTES",
    "HOLD_CHUNK",
    "INTERNAL_ERROR",
    "INTERNAL_ERROR_REPLY",
    "PASS_THROUGH",
    "PASS_THROUGH_REPLY",
    "REQUEST_TOO_LARGE",
    "RESPONSE_TOO_LARGE",
    "ROUTE_ATTRIBUTE",
    "ROUTE_METADATA_KEY",
    "Mode",
    "body_mode",
    "chunk_reply",
    "client_address",
    "common_request",
    "common_response",
    "decode",
    "headers_from",
    "immediate",
    "modes",
    "route_key",
    "stream_modes",
    "trailers_reply",
    "whole_body_mutation",
]

ROUTE_METADATA_KEY: Final = "x-policy-route"
"""gRPC invocation metadata key carrying the route key (set per route by Envoy)."""

ATTRIBUTES_KEY: Final = "envoy.filters.http.ext_proc"
"""Key of ``ProcessingRequest.attributes`` (hard-coded by Envoy, whatever the filter name)."""

ROUTE_ATTRIBUTE: Final = "xds.route_name"
"""Fallback attribute holding the route name."""

DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024
"""Largest request or response body a policy sees (the spec's 10 MB); bigger -> 413/500."""

Mode = processing_mode_pb2.ProcessingMode
_CONTINUE_AND_REPLACE: Final = pb.CommonResponse.CONTINUE_AND_REPLACE
_NO_APPEND: Final = wrappers_pb2.BoolValue(value=False)
_APPEND: Final = wrappers_pb2.BoolValue(value=True)


PASS_THROUGH: Final = Mode(
    request_body_mode=Mode.NONE, response_header_mode=Mode.SKIP, response_body_mode=Mode.NONE
)
PASS_THROUGH_REPLY: Final = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse(), mode_override=PASS_THROUGH
)
"""The reply that lets a request through untouched, asking for nothing more."""
INTERNAL_ERROR: Final = ImmediateResponse(
    status=500, headers={"content-type": "text/plain"}, body=b"policy engine error\n"
)


_BODY_MODES: Final = (
    Mode.NONE,
    Mode.STREAMED,
    Mode.BUFFERED,
    Mode.BUFFERED_PARTIAL,
    Mode.FULL_DUPLEX_STREAMED,
)
# Every mode override a request can get, built once: (request body, response, response body).
_MODES: Final = {
    (request_body, response, response_body): Mode(
        request_body_mode=request_body,
        response_header_mode=Mode.SEND if response else Mode.SKIP,
        response_body_mode=response_body,
    )
    for request_body, response, response_body in itertools.product(
        _BODY_MODES, (False, True), _BODY_MODES
    )
}


def modes(request_body: int, response: bool, response_body: int) -> Any:
    return _MODES[(request_body, response, response_body)]


def body_mode(configured: int) -> int:
    """The body mode to ask for, given the filter's configured one (``protocol_config``).

    NONE/BUFFERED: ask BUFFERED. A STREAMED or BUFFERED_PARTIAL filter config is asked for
    again unchanged: whether Envoy honours the override or not, the mode is then known, and
    the body handling matches it (see ``StreamMachine._whole_body``,
    :mod:`engine.transport.stream`).
    """
    if configured in (Mode.STREAMED, Mode.BUFFERED_PARTIAL, Mode.FULL_DUPLEX_STREAMED):
        return configured
    return int(Mode.BUFFERED)


HOLD_CHUNK: Final = pb.BodyResponse(
    response=pb.CommonResponse(body_mutation=pb.BodyMutation(clear_body=True))
)
REQUEST_TOO_LARGE: Final = ImmediateResponse(
    status=413,
    headers={"content-type": "application/json"},
    body=b'{"error": "request body too large for the policy engine"}',
)
RESPONSE_TOO_LARGE: Final = ImmediateResponse(
    status=500,
    headers={"content-type": "application/json"},
    body=b'{"error": "response body too large for the policy engine"}',
)


def whole_body_mutation(changed: bytes | None, original: bytes) -> Any:
    """Last reply of a STREAMED body: the whole (possibly rewritten) body, as the earlier
    chunks were held back."""
    common = pb.CommonResponse()
    common.body_mutation.body = changed if changed is not None else original
    return common


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def headers_from(http: pb.HttpHeaders) -> tuple[Headers, dict[str, str]]:
    """Split Envoy headers into (regular, pseudo); names lower-case, repeats kept apart."""
    # The hottest loop of a dynamic chain: one pass, no Headers method call per header.
    values: dict[str, list[str]] = {}
    pseudo: dict[str, str] = {}
    for hv in http.headers.headers:
        name = hv.key.lower()
        raw = hv.raw_value
        value = decode(raw) if raw else hv.value
        if name[:1] == ":":
            pseudo[name] = value
        elif name in values:
            values[name].append(value)
        else:
            values[name] = [value]
    return Headers.adopt(values), pseudo


def route_key(
    context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse] | None,
    message: pb.ProcessingRequest,
    route_names: RouteNamePattern | None = None,
) -> str:
    """Route key from the invocation metadata (gRPC only: ``context`` None over HTTP), else
    the ``xds.route_name`` attribute, else ""."""
    metadata = context.invocation_metadata() if context is not None else None
    for key, value in metadata or ():
        if key == ROUTE_METADATA_KEY:
            return value if isinstance(value, str) else decode(value)
    if ATTRIBUTES_KEY in message.attributes:
        fields = message.attributes[ATTRIBUTES_KEY].fields
        if ROUTE_ATTRIBUTE in fields:
            name = str(fields[ROUTE_ATTRIBUTE].string_value)
            # A generated route name (Envoy Gateway, Istio) -> its key: --route-name-pattern.
            return name if route_names is None else route_names.key(name)
    return ""


def _strip_port(address: str) -> str:
    if address.startswith("["):  # [v6]:port
        return address[1:].partition("]")[0]
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host
    return address


CLIENT_ADDRESS_ATTRIBUTE: Final = "source.address"
"""The request attribute holding the client's address as Envoy established it."""


def client_address(message: pb.ProcessingRequest) -> str:
    """The client's address as Envoy established it, never as a request header claims it.

    Only Envoy's ``source.address`` request attribute counts (configure the ext_proc
    filter's ``request_attributes: [source.address]``): Envoy's downstream remote address,
    which follows its ``use_remote_address`` / ``xff_num_trusted_hops`` /
    ``original_ip_detection_extensions`` settings. The engine never reads
    ``x-forwarded-for`` itself: it cannot tell which hops Envoy appended and which the
    client wrote. Without the attribute the address is ``""`` (unknown), and a policy
    keyed on it fails (rateLimit ``keyBy: clientIp`` names the attribute to add).
    """
    if ATTRIBUTES_KEY in message.attributes:
        fields = message.attributes[ATTRIBUTES_KEY].fields
        if CLIENT_ADDRESS_ATTRIBUTE in fields:
            return _strip_port(str(fields[CLIENT_ADDRESS_ATTRIBUTE].string_value))
    return ""


def _option(name: str, value: str, append: Any = _NO_APPEND) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode("utf-8")), append=append
    )


def _mutation(
    set_headers: Mapping[str, str],
    remove_headers: Iterable[str],
    append_headers: Iterable[tuple[str, str]] = (),
) -> Any:
    # Envoy applies set_headers in order: the overwrites (append=false) first, then each
    # appended value as its own header line (append=true; append_action is ignored).
    options = [_option(name, value) for name, value in set_headers.items()]
    options += [_option(name, value, _APPEND) for name, value in append_headers]
    return pb.HeaderMutation(set_headers=options, remove_headers=list(remove_headers))


def common_request(outcome: RequestOutcome, *, body_buffered: bool) -> Any:
    """CommonResponse for a request outcome (None-valued fields mean unchanged)."""
    set_headers = dict(outcome.set_headers)
    if outcome.path is not None:
        set_headers[":path"] = outcome.path
    if outcome.method is not None:
        set_headers[":method"] = outcome.method
    return _common(
        set_headers,
        outcome.remove_headers,
        outcome.append_headers,
        outcome.body,
        body_buffered=body_buffered,
    )


def common_response(outcome: ResponseOutcome, *, body_buffered: bool) -> Any:
    """CommonResponse for a response outcome; the status travels as ``:status``."""
    set_headers = dict(outcome.set_headers)
    if outcome.status is not None:
        set_headers[":status"] = str(outcome.status)
    return _common(
        set_headers,
        outcome.remove_headers,
        outcome.append_headers,
        outcome.body,
        body_buffered=body_buffered,
    )


def _common(
    set_headers: dict[str, str],
    remove_headers: Iterable[str],
    append_headers: tuple[tuple[str, str], ...],
    body: bytes | None,
    *,
    body_buffered: bool,
) -> Any:
    common = pb.CommonResponse()
    if body is not None:
        common.body_mutation.body = body
        if body_buffered:
            # BUFFERED + headers SEND: Envoy rejects a body whose length != Content-Length.
            set_headers["content-length"] = str(len(body))
        else:
            # Replacing a body Envoy did not buffer: it drops Content-Length and the old body.
            common.status = _CONTINUE_AND_REPLACE
    remove = [name for name in remove_headers if name not in set_headers]
    if set_headers or remove or append_headers:
        common.header_mutation.CopyFrom(_mutation(set_headers, remove, append_headers))
    return common


def immediate(response: ImmediateResponse) -> pb.ProcessingResponse:
    """ProcessingResponse answering the client now with ``response``."""
    immediate = pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=response.status), body=response.body
    )
    if response.headers:
        immediate.headers.CopyFrom(_mutation(response.headers, ()))
    return pb.ProcessingResponse(immediate_response=immediate)


INTERNAL_ERROR_REPLY: Final = immediate(INTERNAL_ERROR)


# -- streamed bodies ------------------------------------------------------------------

_FDS: Final = Mode.FULL_DUPLEX_STREAMED


def stream_modes(
    *, request_body: int, response: bool, response_body: int, request_stream: bool
) -> Any:
    """The full mode override: body modes as given (``FULL_DUPLEX_STREAMED`` for a
    streamed side, whose trailer mode then becomes SEND); other trailer modes DEFAULT
    (Envoy keeps the filter's own)."""
    mode = Mode(
        request_body_mode=_FDS if request_stream else request_body,
        response_header_mode=Mode.SEND if response else Mode.SKIP,
        response_body_mode=response_body,
    )
    if request_stream:
        mode.request_trailer_mode = Mode.SEND
    if response_body == _FDS:
        mode.response_trailer_mode = Mode.SEND
    return mode


def chunk_reply(side: str, data: bytes, end: bool) -> pb.ProcessingResponse:
    """The reply carrying ``data`` on (``end``: the body ends with it)."""
    common = pb.CommonResponse()
    streamed = common.body_mutation.streamed_response
    streamed.body = data
    streamed.end_of_stream = end
    if side == "request":
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))


def trailers_reply(side: str) -> pb.ProcessingResponse:
    if side == "request":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
