"""engine.transport.grpc_service with streamed bodies, through a real grpc.aio server and
client (no Envoy): the mode override that asks for FULL_DUPLEX_STREAMED, the streamed
replies, pieces after the end, trailers, dynamic metadata at the end of the stream. Through
Envoy: tests/e2e/test_streaming.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as mode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from engine.chain import Chain, ChainPolicy, Snapshot
from engine.envoy_metadata import EnvoyMetadata
from engine.policy import (
    ImmediateResponse,
    RequestContext,
    ResponseContext,
    ResponseModifications,
)
from engine.store import ConfigStore
from engine.streaming import Chunk, EndStream, Framing
from engine.transport.grpc_service import PolicyProcessor
from engine.transport.messages import ROUTE_METADATA_KEY
from engine.transport.testing import (
    request_body,
    request_headers,
    response_body,
    response_headers,
    serving,
)

FDS = "FULL_DUPLEX_STREAMED"


class UpperLines:
    """Response: upper-cases each line; ``stop`` ends the body; counts lines in metadata."""

    def on_response(self, ctx: ResponseContext) -> None:
        return None

    def response_framing(self, ctx: ResponseContext) -> Framing:
        return Framing("lines", 1024)

    def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> bytes | EndStream:
        if chunk.data == b"stop\n":
            return EndStream(b"END\n")
        if chunk.data:
            ctx.metadata["lines"] = ctx.metadata.get("lines", 0) + 1
        return chunk.data.upper()


class Guard:
    """Request: passes lines on, answers 413 on a line ``big``."""

    def on_request(self, ctx: RequestContext) -> None:
        return None

    def request_framing(self, ctx: RequestContext) -> Framing:
        return Framing("lines", 1024)

    def on_request_chunk(self, ctx: RequestContext, chunk: Chunk) -> ImmediateResponse | None:
        return ImmediateResponse(413, body=b"no") if chunk.data == b"big\n" else None


class Tag:
    """Response headers only: tags the response."""

    def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        return ResponseModifications(set_headers={"x-tag": "1"})


class Whole:
    """A body policy written for whole bodies only."""

    def on_response(self, ctx: ResponseContext) -> None:
        return None


def entry(instance: Any, side: str) -> ChainPolicy:
    return ChainPolicy(
        name=type(instance).__name__,
        version="v1.0.0",
        instance=instance,
        has_request=side == "request",
        has_response=side == "response",
        requires_request_body=side == "request",
        requires_response_body=side == "response",
    )


ROUTES = {
    "down": [entry(UpperLines(), "response")],
    "up": [entry(Guard(), "request")],
    "mixed": [entry(UpperLines(), "response"), entry(Whole(), "response")],
    "both": [
        entry(Guard(), "request"),
        ChainPolicy(name="Tag", version="v1.0.0", instance=Tag(), has_response=True),
    ],
}


@pytest.fixture
async def target() -> AsyncIterator[str]:
    snapshot = Snapshot(
        routes=MappingProxyType({k: Chain(route=k, policies=tuple(v)) for k, v in ROUTES.items()}),
        source="test",
        version=1,
    )
    store = ConfigStore(snapshot)
    processor = PolicyProcessor(store, envoy_metadata=EnvoyMetadata(keys=["lines"]))
    async with serving(store, processor) as target:
        yield target


class Call:
    """A raw ``Process`` call: write messages, read replies (M:N, as Envoy does)."""

    def __init__(self, channel: grpc.aio.Channel, route: str) -> None:
        stub = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=pb.ProcessingRequest.SerializeToString,
            response_deserializer=pb.ProcessingResponse.FromString,
        )
        self.call: Any = stub(metadata=((ROUTE_METADATA_KEY, route),), timeout=5)  # type: ignore[call-arg]

    async def send(self, message: Any) -> None:
        await self.call.write(message)

    async def read(self) -> Any:
        async with asyncio.timeout(5):
            return await self.call.read()

    async def exchange(self, message: Any) -> Any:
        await self.send(message)
        return await self.read()


@pytest.fixture
async def channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target) as ch:
        yield ch


def streamed(reply: Any, side: str) -> tuple[bytes, bool]:
    body = getattr(reply, f"{side}_body").response.body_mutation.streamed_response
    return bytes(body.body), body.end_of_stream


def names(mode_override: Any) -> dict[str, str]:
    return {
        field.name: mode.ProcessingMode.BodySendMode.Name(value)
        if "body" in field.name
        else mode.ProcessingMode.HeaderSendMode.Name(value)
        for field, value in mode_override.ListFields()
    }


async def test_response_streams_piece_by_piece(channel: grpc.aio.Channel) -> None:
    call = Call(channel, "down")
    head = await call.exchange(request_headers())
    assert names(head.mode_override) == {
        "response_header_mode": "SEND",
        "response_body_mode": FDS,
        "response_trailer_mode": "SEND",
    }
    reply = await call.exchange(response_headers(200, end_of_stream=False))
    assert reply.WhichOneof("response") == "response_headers"
    first = await call.exchange(response_body(b"one\ntw", end_of_stream=False))
    assert streamed(first, "response") == (b"ONE\n", False)
    assert not first.HasField("dynamic_metadata")  # metadata rides on the end only
    last = await call.exchange(response_body(b"o\n", end_of_stream=True))
    assert streamed(last, "response") == (b"TWO\n", True)
    assert (
        last.dynamic_metadata.fields["policy_engine"].struct_value.fields["lines"].number_value == 2
    )
    assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]


async def test_a_policy_ending_the_body_keeps_the_stream_and_drops_later_pieces(
    channel: grpc.aio.Channel,
) -> None:
    call = Call(channel, "down")
    await call.exchange(request_headers())
    await call.exchange(response_headers(200, end_of_stream=False))
    cut = await call.exchange(response_body(b"a\nstop\nb\n", end_of_stream=False))
    assert streamed(cut, "response") == (b"A\nEND\n", True)
    # Envoy may still send pieces: none is answered, and the stream stays open (closing
    # it would let the rest pass unprocessed) until Envoy resets it.
    await call.send(response_body(b"late\n", end_of_stream=True))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await call.call.read()
    call.call.cancel()


async def test_a_body_policy_without_chunk_hook_keeps_the_phase_buffered(
    channel: grpc.aio.Channel,
) -> None:
    head = await Call(channel, "mixed").exchange(request_headers())
    assert names(head.mode_override)["response_body_mode"] == "BUFFERED"


async def test_request_streams_and_a_policy_answers_mid_body(channel: grpc.aio.Channel) -> None:
    call = Call(channel, "up")
    head = await call.exchange(request_headers("/", "POST", end_of_stream=False))
    assert names(head.mode_override) == {
        "request_body_mode": FDS,
        "request_trailer_mode": "SEND",
        # Asked although no policy reads the response: the response then waits for the
        # reply that ends the request body (and carries its dynamic metadata).
        "response_header_mode": "SEND",
    }
    ok = await call.exchange(request_body(b"fine\nbi", end_of_stream=False))
    assert streamed(ok, "request") == (b"fine\n", False)
    answer = await call.exchange(request_body(b"g\n", end_of_stream=False))
    assert answer.immediate_response.status.code == 413
    assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]


async def test_a_repeated_final_piece_is_not_answered(channel: grpc.aio.Channel) -> None:
    # envoyproxy/envoy#46237: Envoy may send the last piece (end_of_stream) twice. The
    # repeat gets no reply (it would be a second end) and the stream goes on.
    call = Call(channel, "both")
    head = await call.exchange(request_headers("/", "POST", end_of_stream=False))
    assert names(head.mode_override)["response_header_mode"] == "SEND"
    last = await call.exchange(request_body(b"x\n", end_of_stream=True))
    assert streamed(last, "request") == (b"x\n", True)
    await call.send(request_body(b"x\n", end_of_stream=True))
    reply = await call.exchange(response_headers(200))
    assert reply.WhichOneof("response") == "response_headers"
    tag = reply.response_headers.response.header_mutation.set_headers[0]
    assert (tag.header.key, tag.header.raw_value) == ("x-tag", b"1")
    assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]

    routes_call = Call(channel, "up")
    await routes_call.exchange(request_headers("/", "POST", end_of_stream=False))
    last = await routes_call.exchange(request_body(b"x\n", end_of_stream=True))
    assert streamed(last, "request") == (b"x\n", True)
    # No response phase: the stream is over once the body ended.
    assert await routes_call.read() is grpc.aio.EOF  # type: ignore[attr-defined]

    call = Call(channel, "down")
    await call.exchange(request_headers())
    await call.exchange(response_headers(200, end_of_stream=False))
    final = await call.exchange(response_body(b"a\n", end_of_stream=True))
    assert streamed(final, "response") == (b"A\n", True)
    assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]


async def test_trailers_end_a_streamed_body(channel: grpc.aio.Channel) -> None:
    call = Call(channel, "up")
    await call.exchange(request_headers("/", "POST", end_of_stream=False))
    held = await call.exchange(request_body(b"partial", end_of_stream=False))
    assert streamed(held, "request") == (b"", False)
    await call.send(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    flushed = await call.read()
    assert streamed(flushed, "request") == (b"partial", False)
    trailers = await call.read()
    assert trailers.WhichOneof("response") == "request_trailers"


async def test_body_less_request_never_streams(channel: grpc.aio.Channel) -> None:
    call = Call(channel, "up")
    head = await call.exchange(request_headers("/", "GET", end_of_stream=True))
    assert "request_body_mode" not in names(head.mode_override)  # NONE, the default
    assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]


async def test_filter_configured_full_duplex_is_refused(channel: grpc.aio.Channel) -> None:
    # Envoy ignores every mode override then: the engine cannot choose the modes it needs.
    message = request_headers("/", "POST", end_of_stream=False)
    message.protocol_config.request_body_mode = mode.ProcessingMode.FULL_DUPLEX_STREAMED
    reply = await Call(channel, "up").exchange(message)
    assert reply.immediate_response.status.code == 500


async def test_missing_streamed_body_fails_closed(channel: grpc.aio.Channel) -> None:
    # Envoy ignored the override (allowed_override_modes without a matching entry): the
    # response arrives and no piece of the body ever did.
    call = Call(channel, "up")
    await call.exchange(request_headers("/", "POST", end_of_stream=False))
    reply = await call.exchange(response_headers(200))
    assert reply.immediate_response.status.code == 500


class Grow:
    """Response: every piece goes on four times over."""

    def on_response(self, ctx: ResponseContext) -> None:
        return None

    def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> bytes:
        return chunk.data * 4


async def test_a_piece_grown_over_the_body_limit_fails_closed() -> None:
    # Before: the grown piece was sent as it was; past the gRPC message limit (2 x
    # max_body_bytes + 1 MiB) that failed the whole stream with RESOURCE_EXHAUSTED, and
    # with failure_mode_allow Envoy passes the rest of the body unprocessed.
    chain = Chain(route="grow", policies=(entry(Grow(), "response"),))
    store = ConfigStore(
        Snapshot(routes=MappingProxyType({"grow": chain}), source="test", version=1)
    )
    processor = PolicyProcessor(store, max_body_bytes=100)
    async with serving(store, processor) as target, grpc.aio.insecure_channel(target) as ch:
        call = Call(ch, "grow")
        await call.exchange(request_headers())
        await call.exchange(response_headers(200, end_of_stream=False))
        small = await call.exchange(response_body(b"x" * 25, end_of_stream=False))
        assert streamed(small, "response") == (b"x" * 100, False)
        big = await call.exchange(response_body(b"x" * 26, end_of_stream=False))
        assert big.WhichOneof("response") == "immediate_response"
        assert big.immediate_response.status.code == 500
        assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
    assert processor.stats.policy_failures == 1
