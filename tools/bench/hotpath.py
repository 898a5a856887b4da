"""The engine's own cost per request, without gRPC: ``PolicyProcessor.Process`` in-process.

The end-to-end benchmark measures the engine's CPU per request through Envoy, where grpc.aio's
per-stream machinery is most of the figure and the machine's noise is large. This section
isolates the part the engine's code controls: for each chain it drives one stream per request
through ``PolicyProcessor.Process`` exactly as grpc.aio does (each message parsed from the bytes
Envoy sends, each reply serialized), on a uvloop event loop, and reports microseconds per
request next to a trivial servicer doing the same parsing and serializing with prebuilt empty
replies (the in-process floor). The difference is the engine's own Python work per request.

Run alone (from the repository root, ``PYTHONPATH=.:generated/python``)::

    python -m tools.bench.hotpath [--iterations N] [--profile PATH]

``--routes a,b`` measures only those chains (and the floors). ``--profile PATH [--route R]``
writes a cProfile of one chain's requests (read it with ``python -m pstats PATH``).

The ``jwt`` chain is the end-to-end benchmark's (jwtValidation v1.0.0 + rateLimit keyed by
``jwt.sub``) against a real HTTPS JWKS server on 127.0.0.1 (the test double), every request
carrying the same valid RS256 token, as wrk sends it; ``auth`` is apiKey + rateLimit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import cProfile
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from engine.config import load_config
from engine.envoy_metadata import EnvoyMetadata
from engine.store import ConfigStore
from engine.transport.grpc_service import PolicyProcessor
from engine.transport.messages import ROUTE_METADATA_KEY
from policies.jwtValidation.testing import JwksServer, KeySet, claims, make_pki
from tools.bench.engine_main import manifest_registry
from tools.bench.floor import reply_for
from tools.bench.paths import engine_config, json_body

__all__ = ["format_lines", "run"]

# What Envoy 1.36 sends for the benchmark's GET (wrk), as seen at the engine.
_REQUEST_HEADERS: Final = (
    (":authority", "127.0.0.1:10000"),
    (":path", "/headers/x"),
    (":method", "GET"),
    (":scheme", "http"),
    ("user-agent", "wrk"),
    ("x-forwarded-proto", "http"),
    ("x-request-id", "5b0c6a8e-3f36-4c55-9d0a-7f3b2f3c1d11"),
)
_RESPONSE_HEADERS: Final = (
    (":status", "200"),
    ("server", "envoy"),
    ("date", "Tue, 01 Dec 2026 22:00:00 GMT"),
    ("content-type", "text/plain"),
    ("content-length", "2"),
    ("connection", "keep-alive"),
    ("x-envoy-upstream-service-time", "0"),
)
# route key -> ext_proc messages Envoy sends for it (the reply's mode override decides).
_CHAINS: Final = ("empty", "headers-request", "headers", "auth", "jwt", "json")
_API_KEY: Final = "bench-key-0123456789"


def _headers(pairs: tuple[tuple[str, str], ...], *, end_of_stream: bool) -> pb.HttpHeaders:
    return pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
        ),
        end_of_stream=end_of_stream,
    )


def _messages(route: str, token: str = "") -> list[bytes]:
    """The serialized messages of one request on ``route`` (``token``: the ``jwt`` chain's)."""
    has_body = route == "json"
    extra = {
        "json": (("content-type", "application/json"),),
        "auth": (("x-api-key", _API_KEY),),
        "jwt": (("authorization", f"Bearer {token}"),),
    }
    request = pb.ProcessingRequest(
        request_headers=_headers(
            (*_REQUEST_HEADERS, *extra.get(route, ())), end_of_stream=not has_body
        )
    )
    request.protocol_config.request_body_mode = 0
    request.protocol_config.response_body_mode = 0
    out = [request.SerializeToString()]
    if has_body:
        body = pb.ProcessingRequest(request_body=pb.HttpBody(body=json_body(), end_of_stream=True))
        out.append(body.SerializeToString())
    response = pb.ProcessingRequest(
        response_headers=_headers(_RESPONSE_HEADERS, end_of_stream=False)
    )
    out.append(response.SerializeToString())
    return out


class _Context:
    """What ``Process`` reads of grpc.aio's ServicerContext."""

    def __init__(self, route: str) -> None:
        self._metadata = ((ROUTE_METADATA_KEY, route),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"stream aborted: {code} {details}")

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        # gRPC would call it once the stream is over; the bench never stops a server.
        pass


async def _incoming(messages: list[bytes]) -> AsyncIterator[pb.ProcessingRequest]:
    for raw in messages:
        yield pb.ProcessingRequest.FromString(raw)


def _engine_request(processor: PolicyProcessor, route: str, token: str) -> Callable[[], Any]:
    messages = _messages(route, token)
    context: Any = _Context(route)  # the part of grpc.aio's ServicerContext Process reads

    async def one() -> int:
        replies = 0
        async for reply in processor.Process(_incoming(messages), context):
            reply.SerializeToString()
            replies += 1
        return replies

    return one


def _floor_request(messages_per_request: int) -> Callable[[], Any]:
    """The trivial servicer (tools/bench/floor.py, its own replies) on the same messages."""
    messages = _messages("headers")[:messages_per_request]
    route = f"floor{messages_per_request}"

    async def process(requests: AsyncIterator[pb.ProcessingRequest]) -> AsyncIterator[Any]:
        async for request in requests:
            reply, done = reply_for(request, route=route)
            yield reply
            if done:
                return

    async def one() -> int:
        replies = 0
        async for reply in process(_incoming(messages)):
            reply.SerializeToString()
            replies += 1
        return replies

    return one


def _time(loop: asyncio.AbstractEventLoop, one: Callable[[], Any], iterations: int) -> float:
    """Median microseconds per request over 15 batches."""

    async def batch(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await one()
        return (time.perf_counter() - start) / n * 1e6

    loop.run_until_complete(batch(min(200, iterations)))  # warm up
    per = max(1, iterations // 15)
    return statistics.median(loop.run_until_complete(batch(per)) for _ in range(15))


def _new_loop() -> asyncio.AbstractEventLoop:
    import uvloop  # noqa: PLC0415 - the engine's loop (engine/transport/server.py); imported where used

    return uvloop.new_event_loop()


@contextlib.contextmanager
def _processor() -> Iterator[tuple[PolicyProcessor, str]]:
    """The engine on the benchmark's routes plus ``auth``, and the ``jwt`` chain's token;
    the JWKS server behind ``jwt`` runs until the block ends."""
    keys = KeySet.generate()
    with tempfile.TemporaryDirectory(prefix="hotpath-pki-") as directory:
        pki = make_pki(Path(directory))
        with JwksServer(pki, keys.published) as jwks:
            config = engine_config(jwks.url, str(pki.ca_file))
            routes = config["routes"]
            api_key = {
                "name": "apiKey",
                "version": "v1.0.0",
                "parameters": {"keys": [{"key": _API_KEY, "consumer": "bench"}]},
            }
            rate_limit = copy.deepcopy(routes["jwt"]["policies"][1])
            rate_limit["parameters"]["keyName"] = "apiKey.consumer"
            routes["auth"] = {"policies": [api_key, rate_limit]}
            snapshot = load_config(config, source="bench-hotpath", registry=manifest_registry())
            token = keys.rsa.sign(claims(sub="bench", exp=int(time.time()) + 3600))
            # The engine's default (engine/main.py): dynamic chains' metadata goes to Envoy.
            yield PolicyProcessor(ConfigStore(snapshot), envoy_metadata=EnvoyMetadata()), token


def run(iterations: int = 20000, routes: tuple[str, ...] = _CHAINS) -> dict[str, Any]:
    """us/request of each chain in ``routes`` and of the in-process floor with the same
    message count."""
    loop = _new_loop()
    try:
        with _processor() as (processor, token):
            results: dict[str, Any] = {}
            floors = {n: _time(loop, _floor_request(n), iterations) for n in (1, 2)}
            results["floor_1_message_us"] = floors[1]
            results["floor_2_messages_us"] = floors[2]
            for route in routes:
                one = _engine_request(processor, route, token)
                replies = loop.run_until_complete(one())  # also fetches the JWKS once
                n = iterations if route != "json" else max(200, iterations // 20)
                us = _time(loop, one, n)
                row: dict[str, Any] = {"us_per_request": us, "messages": replies}
                if replies in floors:
                    row["floor_us"] = floors[replies]
                    row["engine_own_us"] = us - floors[replies]
                results[route] = row
            return results
    finally:
        loop.close()


def profile(path: str, route: str = "headers", iterations: int = 20000) -> None:
    """cProfile of ``route``'s requests, written to ``path``."""
    loop = _new_loop()
    try:
        with _processor() as (processor, token):
            one = _engine_request(processor, route, token)

            async def many() -> None:
                for _ in range(iterations):
                    await one()

            loop.run_until_complete(one())
            profiler = cProfile.Profile()
            profiler.runcall(loop.run_until_complete, many())
            profiler.dump_stats(path)
    finally:
        loop.close()


def format_lines(results: dict[str, Any]) -> Iterator[str]:
    yield (
        "| chain (in-process, no gRPC) | ext_proc messages | us/request | floor us "
        "| engine's own us |"
    )
    yield "|---|---|---|---|---|"
    for route in _CHAINS:
        if route not in results:
            continue
        row = results[route]
        floor = f"{row['floor_us']:.1f}" if "floor_us" in row else "-"
        own = f"{row['engine_own_us']:.1f}" if "engine_own_us" in row else "-"
        yield f"| {route} | {row['messages']} | {row['us_per_request']:.1f} | {floor} | {own} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--profile", metavar="PATH", help="write a cProfile of --route's requests")
    parser.add_argument("--route", choices=_CHAINS, default="headers")
    parser.add_argument(
        "--routes", default=",".join(_CHAINS), help="comma-separated chains to measure"
    )
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.profile, args.route, args.iterations)
        return 0
    routes = tuple(r for r in args.routes.split(",") if r)
    unknown = [r for r in routes if r not in _CHAINS]
    if unknown:
        parser.error(f"unknown chain(s): {', '.join(unknown)}; known: {', '.join(_CHAINS)}")
    for line in format_lines(run(args.iterations, routes)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
