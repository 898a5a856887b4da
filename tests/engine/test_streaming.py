"""engine.streaming: which phases stream, and the pipeline that runs chunk hooks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.chain import ChainPolicy
from engine.conditions import compile_condition
from engine.policy import ImmediateResponse, RequestContext, ResponseContext
from engine.streaming import BodyStream, Chunk, EndStream, Framing, Hold, streams
from engine.streaming_testing import stream_body
from engine.testing import make_request_context, make_response_context
from engine.timing import TIMING_KEY


class Passthrough:
    def on_response(self, ctx: ResponseContext) -> None:
        return None

    def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> None:
        return None


class Buffered:
    def on_response(self, ctx: ResponseContext) -> None:
        return None


class Lines:
    """Upper-cases each line; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bool]] = []

    def on_response(self, ctx: ResponseContext) -> None:
        return None

    def response_framing(self, ctx: ResponseContext) -> Framing | None:
        return Framing("lines", 16)

    def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> Any:
        self.seen.append((chunk.data, chunk.end_of_stream))
        return chunk.data.upper()


def entry(instance: Any, side: str = "response", **flags: Any) -> ChainPolicy:
    return ChainPolicy(
        name=type(instance).__name__,
        version="v1.0.0",
        instance=instance,
        has_request=side == "request",
        has_response=side == "response",
        requires_request_body=side == "request",
        requires_response_body=side == "response",
        **flags,
    )


def test_a_phase_streams_only_when_every_body_policy_can() -> None:
    assert streams([entry(Passthrough())], "response")
    assert not streams([entry(Passthrough()), entry(Buffered())], "response")
    assert not streams([entry(Passthrough(), shadow=True)], "response")
    assert not streams([entry(Passthrough())], "request")  # no body needed there
    header_only = ChainPolicy(name="h", version="v", instance=Buffered(), has_response=True)
    assert streams([header_only, entry(Passthrough())], "response")


async def test_units_go_on_as_soon_as_they_are_whole() -> None:
    policy = Lines()
    out = await stream_body(policy, make_response_context(), [b"ab", b"c\nd", b"e\n", b"f"])
    assert out.pieces == [b"", b"ABC\n", b"DE\n", b"F"]
    assert policy.seen[-1] == (b"f", True)  # the last unit carries end_of_stream


async def test_the_end_is_always_seen_once() -> None:
    policy = Lines()
    out = await stream_body(policy, make_response_context(), [b"a\n", b""])
    assert out.body == b"A\n"
    assert policy.seen == [(b"a\n", False), (b"", True)]


class Holder:
    """Holds the last 3 bytes of each unit (a match may continue), releases at the end."""

    def on_request(self, ctx: RequestContext) -> None:
        return None

    def request_framing(self, ctx: RequestContext) -> Framing:
        return Framing("bytes", 8)

    def on_request_chunk(self, ctx: RequestContext, chunk: Chunk) -> Any:
        data = chunk.data.replace(b"secret", b"******")
        if chunk.end_of_stream:
            return data
        return Hold(emit=data[:-3], keep=data[-3:])


async def test_hold_hands_bytes_back_with_the_next_unit() -> None:
    out = await stream_body(Holder(), make_request_context(), [b"a sec", b"ret b", b"!"])
    assert out.pieces == [b"a ", b"*****", b"* b!"]  # the match was whole in one unit


async def test_holding_over_the_cap_fails_per_on_error() -> None:
    class Greedy(Holder):
        def on_request_chunk(self, ctx: RequestContext, chunk: Chunk) -> Hold | None:
            return None if chunk.end_of_stream else Hold(keep=chunk.data)

    ctx = make_request_context()
    closed = await stream_body(Greedy(), ctx, [b"12345", b"6789", b"x"], error_status=503)
    assert closed.immediate is not None
    assert closed.immediate.status == 503
    opened = await stream_body(Greedy(), ctx, [b"12345", b"6789", b"x"], fail_open=True)
    assert opened.pieces == [b"", b"123456789", b"x"]  # released in order, then bypassed


async def test_failures_fail_open_or_closed() -> None:
    class Boom(Lines):
        def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> bytes:
            if b"boom" in chunk.data:
                raise RuntimeError("boom")
            return chunk.data.upper()

    ctx = make_response_context()
    pieces = [b"a\nboom\nc", b"\nd\n"]
    assert (await stream_body(Boom(), ctx, pieces)).immediate is not None
    opened = await stream_body(Boom(), ctx, pieces, fail_open=True)
    assert opened.body == b"A\nboom\nc\nd\n"  # from the failing unit on, untouched


async def test_bad_results_and_timeouts_are_failures() -> None:
    class Wrong(Lines):
        def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> Any:
            return ImmediateResponse(403)  # request phase only

    class Slow(Lines):
        async def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> Any:
            await asyncio.sleep(5)
            return b""

    ctx = make_response_context()
    assert (await stream_body(Wrong(), ctx, [b"a\n"])).immediate is not None
    slow = await stream_body(Slow(), ctx, [b"a\n"], hook_timeout=0.01, fail_open=True)
    assert slow.body == b"a\n"


async def test_end_stream_cuts_and_passes_through_later_policies() -> None:
    class Cut(Lines):
        def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> EndStream | None:
            return EndStream(b"last\n") if chunk.data == b"stop\n" else None

    later = Lines()
    ctx = make_response_context()
    stream = BodyStream.start("r", "response", [entry(Cut()), entry(later)], ctx)
    assert isinstance(stream, BodyStream)
    step = await stream.push(b"a\nstop\nnever\n", False)
    assert (step.data, step.end) == (b"A\nLAST\n", True)
    assert later.seen[-1] == (b"last\n", True)
    assert stream.ended


async def test_request_policy_answers_immediately() -> None:
    class Guard(Holder):
        def on_request_chunk(self, ctx: RequestContext, chunk: Chunk) -> ImmediateResponse | None:
            return ImmediateResponse(413) if b"big" in chunk.data else None

    out = await stream_body(Guard(), make_request_context(), [b"ok", b"big", b"never"])
    assert out.pieces == [b"ok"]
    assert out.immediate == ImmediateResponse(413)


async def test_metadata_written_by_chunk_hooks_is_shared() -> None:
    class Count(Lines):
        def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> None:
            chunk.state["n"] = chunk.state.get("n", 0) + 1
            ctx.metadata["count"] = chunk.state["n"]

    ctx = make_response_context()
    await stream_body(Count(), ctx, [b"a\nb\n", b"c\n", b""])
    assert ctx.metadata["count"] == 4  # three lines and the end
    assert ctx.request.metadata is ctx.metadata


def test_conditions_and_framing_choose_the_stages() -> None:
    class Declines(Lines):
        def response_framing(self, ctx: ResponseContext) -> None:
            return None

    ctx = make_response_context(path="/skip")
    skipped = entry(Lines(), condition=compile_condition("request.path != '/skip'"))
    stream = BodyStream.start("r", "response", [skipped, entry(Declines())], ctx)
    assert isinstance(stream, BodyStream)
    assert stream.held == 0
    assert not stream._stages

    class BadFraming(Lines):
        def response_framing(self, ctx: ResponseContext) -> Any:
            return "sse"

    failed = BodyStream.start("r", "response", [entry(BadFraming())], ctx)
    assert isinstance(failed, ImmediateResponse)


def test_framing_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown framing"):
        Framing("xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        Framing("bytes", 0)


class Slow(Lines):
    """Sleeps in each chunk hook: its summed time is at least the sleeps."""

    async def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> Any:
        await asyncio.sleep(0.02)
        return chunk.data


async def test_timing_chains_record_each_stage_summed_over_the_body() -> None:
    ctx = make_response_context()
    stream = BodyStream.start("r", "response", [entry(Slow()), entry(Lines())], ctx, timed=True)
    assert isinstance(stream, BodyStream)
    await stream.push(b"a\n", False)
    assert TIMING_KEY not in ctx.metadata  # recorded once, when the body ends
    await stream.push(b"b\n", True)
    entries = ctx.metadata[TIMING_KEY].split(", ")
    assert [e.partition(";dur=")[0] for e in entries] == [
        'Slow;desc="response body"',
        'Lines;desc="response body"',
    ]
    slow_ms = float(entries[0].partition(";dur=")[2])
    assert slow_ms >= 40  # two units of 20 ms each: the hook's time, not one call's


async def test_request_bodies_are_timed_and_untimed_chains_record_nothing() -> None:
    class Guard(Holder):
        def on_request_chunk(self, ctx: RequestContext, chunk: Chunk) -> ImmediateResponse | None:
            return ImmediateResponse(413) if b"big" in chunk.data else None

    timed_ctx = make_request_context()
    stream = BodyStream.start("r", "request", [entry(Guard(), "request")], timed_ctx, timed=True)
    assert isinstance(stream, BodyStream)
    step = await stream.push(b"big", False)  # an answer ends the body: recorded then
    assert step.immediate == ImmediateResponse(413)
    assert timed_ctx.metadata[TIMING_KEY].startswith("Guard;desc=body;dur=")

    plain_ctx = make_request_context()
    stream = BodyStream.start("r", "request", [entry(Guard(), "request")], plain_ctx)
    assert isinstance(stream, BodyStream)
    await stream.push(b"ok", True)
    assert TIMING_KEY not in plain_ctx.metadata
