"""Test helper for streaming policies: run a body through a chunk hook, piece by piece.

The engine's own pipeline (:class:`engine.streaming.BodyStream`) runs, framing and caps
included, without Envoy::

    ctx = make_response_context(headers={"content-type": "text/event-stream"})
    out = await stream_body(policy, ctx, [b"data: a@exa", b"mple.com\\n\\n"])
    assert out.body == b"data: [email]\\n\\n"
    assert out.pieces[0] == b""          # held: the event was not complete yet
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.chain import ChainPolicy
from engine.policy import ImmediateResponse, RequestContext, ResponseContext
from engine.streaming import BodyStream, Side

__all__ = ["StreamOutcome", "stream_body"]


@dataclass
class StreamOutcome:
    """What went on after each piece (``pieces``), whether the body ended (by its last
    piece or because the policy ended it: ``ended_early``), or the answer instead."""

    pieces: list[bytes] = field(default_factory=list)
    ended: bool = False
    ended_early: bool = False
    immediate: ImmediateResponse | None = None

    @property
    def body(self) -> bytes:
        """Everything sent on, joined."""
        return b"".join(self.pieces)


async def stream_body(
    instance: Any,
    ctx: RequestContext | ResponseContext,
    pieces: Sequence[bytes],
    *,
    side: Side | None = None,
    fail_open: bool = False,
    hook_timeout: float | None = None,
    error_status: int = 500,
) -> StreamOutcome:
    """Stream ``pieces`` (the last one carries ``end_of_stream``) through ``instance``'s
    chunk hook as the engine would, with the policy's framing and ``onError`` behaviour
    (``fail_open``; ``hook_timeout`` is the entry's ``timeout``). ``side`` defaults to
    the context's kind."""
    if side is None:
        side = "request" if isinstance(ctx, RequestContext) else "response"
    policy = ChainPolicy(
        name=type(instance).__module__.rpartition(".")[2] or "policy",
        version="test",
        instance=instance,
        timeout=hook_timeout,
        fail_open=fail_open,
        error_status=error_status,
        has_request=side == "request",
        has_response=side == "response",
        requires_request_body=side == "request",
        requires_response_body=side == "response",
    )
    outcome = StreamOutcome()
    stream = BodyStream.start("test", side, [policy], ctx)
    if isinstance(stream, ImmediateResponse):
        outcome.immediate = stream
        return outcome
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        step = await stream.push(piece, last)
        if step.immediate is not None:
            outcome.immediate = step.immediate
            return outcome
        outcome.pieces.append(step.data)
        if step.end:
            outcome.ended = True
            outcome.ended_early = not last
            break
    return outcome
