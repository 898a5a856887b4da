"""The ext_proc side of streamed bodies: the mode override that asks Envoy for
``FULL_DUPLEX_STREAMED`` and the replies that carry the policies' output.

How it drives Envoy (checked against Envoy 1.36.4, tests/e2e/test_streaming.py)
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

from typing import Any, Final

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from engine.transport.messages import Mode

__all__ = ["chunk_reply", "stream_modes", "trailers_reply"]

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
