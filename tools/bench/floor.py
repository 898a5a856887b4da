"""Trivial ext_proc servicers: the transport's floor, against which the engine's cost is read.

``python -m tools.bench.floor --impl IMPL --port PORT`` serves
``envoy.service.ext_proc.v3.ExternalProcessor/Process`` doing nothing but replying with prebuilt
empty messages, and ends each stream (OK) once nothing more is expected, as the engine does.
The route key (``x-policy-route`` invocation metadata) says how many messages Envoy sends:

* ``floor1``: the ``request_headers`` reply skips the response phase (one message per request,
  like the engine's empty chain);
* ``floor2``: it asks for response headers too (two messages, like a chain with a response
  policy: the 5-header chain with its response header);
* ``floorbody``: it asks for the request body BUFFERED and answers it with the same body
  as a body mutation (two messages, the body crossing gRPC both ways, like a request body
  transform: the floor of the 100 KB jsonTransform path).

IMPL is one transport: ``grpcaio`` (grpcio's asyncio server, the engine's), ``grpcaio-uvloop``
(the same on uvloop's event loop), ``grpclib-uvloop`` (grpclib: pure-Python HTTP/2 from
``h2``, on uvloop). The grpc.aio ones also serve the standard health service.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any, Final

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

__all__ = ["IMPLS", "main", "reply_for"]

IMPLS: Final = ("grpcaio", "grpcaio-uvloop", "grpclib-uvloop")
_ROUTE_KEY: Final = "x-policy-route"

GRPC_SERVER_OPTIONS: Final = (
    # grpc-core's backlog protection cancels calls the application has not picked up yet
    # once more than 1,000 (soft, randomly) / 3,000 (hard) wait; grpc.aio picks up one at a
    # time, so under load every HTTP request in flight waits there and Envoy answers the
    # cancelled ones 500. Envoy's message_timeout is the load-shedding policy instead.
    ("grpc.server.max_pending_requests", 1_000_000),
    ("grpc.server.max_pending_requests_hard_limit", 1_000_000),
)
_METHOD: Final = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
_Mode = processing_mode_pb2.ProcessingMode


def _headers_reply(*, request_body: int, response: bool) -> pb.ProcessingResponse:
    """The ``request_headers`` reply with a full mode override (omitted modes merge as NONE)."""
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(),
        mode_override=_Mode(
            request_body_mode=request_body,
            response_header_mode=_Mode.SEND if response else _Mode.SKIP,
            response_body_mode=_Mode.NONE,
        ),
    )


_FIRST: Final = {
    response: _headers_reply(request_body=_Mode.NONE, response=response)
    for response in (False, True)
}
_BODY_FIRST: Final = _headers_reply(request_body=_Mode.BUFFERED, response=False)
_OTHERS: Final = {
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def reply_for(message: pb.ProcessingRequest, *, route: str) -> tuple[Any, bool]:
    """(The reply for ``route``'s kind of floor, whether the stream is done after it)."""
    kind = message.WhichOneof("request")
    if route == "floorbody":
        if kind == "request_headers" and not message.request_headers.end_of_stream:
            return _BODY_FIRST, False
        if kind == "request_body":
            common = pb.CommonResponse()
            common.body_mutation.body = message.request_body.body
            return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common)), True
    response_phase = route == "floor2"
    if kind == "request_headers":
        return _FIRST[response_phase], not response_phase
    return _OTHERS[kind or "request_body"], kind == "response_headers"


async def _serve_grpcaio(port: int, stop: asyncio.Event) -> None:
    import grpc  # noqa: PLC0415 - each transport imports only its own library
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415
    from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # noqa: PLC0415

    class Servicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(
            self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
        ) -> AsyncIterator[Any]:
            route = next((v for k, v in context.invocation_metadata() or () if k == _ROUTE_KEY), "")
            async for message in request_iterator:
                reply, done = reply_for(message, route=route)
                yield reply
                if done:
                    return

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *GRPC_SERVER_OPTIONS])
    pb_grpc.add_ExternalProcessorServicer_to_server(Servicer(), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)


async def _serve_grpclib(port: int, stop: asyncio.Event) -> None:
    from grpclib.const import Cardinality, Handler  # noqa: PLC0415
    from grpclib.server import Server, Stream  # noqa: PLC0415

    async def process(stream: Stream[Any, Any]) -> None:
        route = str(stream.metadata.get(_ROUTE_KEY, "")) if stream.metadata is not None else ""
        async for message in stream:
            reply, done = reply_for(message, route=route)
            await stream.send_message(reply)
            if done:
                return

    class Floor:
        def __mapping__(self) -> dict[str, Handler]:
            return {
                _METHOD: Handler(
                    process, Cardinality.STREAM_STREAM, pb.ProcessingRequest, pb.ProcessingResponse
                )
            }

    server = Server([Floor()])
    await server.start("127.0.0.1", port)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


async def _main(impl: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if impl.startswith("grpclib"):
        await _serve_grpclib(port, stop)
    else:
        await _serve_grpcaio(port, stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="floor", description=__doc__)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.impl.endswith("-uvloop"):
        import uvloop  # noqa: PLC0415

        uvloop.run(_main(args.impl, args.port))
    else:
        asyncio.run(_main(args.impl, args.port))


if __name__ == "__main__":
    main()
