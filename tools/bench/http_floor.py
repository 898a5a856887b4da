"""The trivial HTTP ext_proc server: the HTTP transport's floor.

``python -m tools.bench.http_floor --port PORT`` serves Envoy's ``http_service`` ext_proc
POSTs on the engine's own HTTP server (:mod:`engine.transport.http_server`, uvloop), decodes
each JSON ``ProcessingRequest`` (msgspec, as the engine does) and answers a prebuilt reply: to
``request_headers`` one asking for the response headers too (two messages per request, like
the 5-header chain with its response header; routes named ``floor1*``: one message, like
jwtValidation + rateLimit), to ``response_headers`` an empty one. The
difference between the engine and this floor is the engine's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any, Final

import msgspec
import uvloop

from engine.transport.http_server import start_http_server

__all__ = ["main"]

_DECODER: Final = msgspec.json.Decoder(dict[str, Any])


def _first(response: bool) -> bytes:
    mode = {
        "request_body_mode": "NONE",
        "response_header_mode": "SEND" if response else "SKIP",
        "response_body_mode": "NONE",
    }
    return msgspec.json.encode({"request_headers": {}, "mode_override": mode})


_FIRST: Final = {True: _first(True), False: _first(False)}
_SECOND: Final = msgspec.json.encode({"response_headers": {}})


def answer(_path: str, body: bytes) -> tuple[int, bytes]:
    """Routes named ``floor1*`` (the ``xds.route_name`` attribute) skip the response phase."""
    message = _DECODER.decode(body)
    if "request_headers" not in message:
        return 200, _SECOND
    route = message.get("attributes", {}).get("envoy.filters.http.ext_proc", {})
    return 200, _FIRST[not str(route.get("xds.route_name", "")).startswith("floor1")]


async def _main(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await start_http_server(f"127.0.0.1:{port}", answer)
    try:
        await stop.wait()
    finally:
        await server.close(1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="http_floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvloop.run(_main(args.port))


if __name__ == "__main__":
    main()
