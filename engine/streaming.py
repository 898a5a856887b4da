"""Streaming bodies: the chunk hooks of the policy contract and the pipeline that runs them.

A body policy normally sees the whole body (``ctx.body``), which Envoy buffers first. A
policy that can work on pieces implements a *chunk hook* for the phase instead, and the body
then flows through as it arrives (server-sent events, streamed LLM answers, NDJSON feeds,
uploads larger than memory)::

    class Policy:
        async def on_response(self, ctx): ...                 # at the headers: ctx.body is None
        def response_framing(self, ctx): return Framing("sse")   # optional, per stream
        async def on_response_chunk(self, ctx, chunk): ...     # each whole unit, in order

The contract (docs/authors/streaming.md):

* ``on_request_chunk(ctx, chunk)`` / ``on_response_chunk(ctx, chunk)``: ``chunk.data`` is the
  next whole unit (see framing), ``chunk.end_of_stream`` says it is the last (then
  ``chunk.data`` may be empty: the hook always sees the end once). ``chunk.event`` is the
  parsed SSE event with ``sse`` framing. ``chunk.state`` is a dict private to this policy
  and this stream (the same object on every call). Return:

  - ``None``: send the unit on unchanged;
  - ``bytes``: send these instead (``b""`` drops the unit);
  - :class:`Hold` ``(emit, keep)``: send ``emit`` now and hand ``keep`` back, prepended to
    the next unit's ``chunk.data`` (for a match that may continue in the next unit);
  - :class:`EndStream` ``(final)`` (response only): send ``final`` and end the body there;
    the client sees a complete response, the upstream is cut off;
  - an :class:`~engine.policy.ImmediateResponse` (request only): answer the client now
    instead of the upstream (Envoy resets the upstream request).

* Framing, optional ``request_framing(ctx)`` / ``response_framing(ctx)``, called once per
  stream after the headers phase: a :class:`Framing` (``bytes``, ``lines``, ``sse``, and
  ``max_held_bytes``, the most this policy may hold back: an unfinished unit plus what it
  keeps), or ``None`` to leave this body alone (e.g. a content type it does not read).
  Default: ``Framing("bytes")``.
* The headers hook (``on_request`` / ``on_response``) still runs first, at the headers,
  with ``ctx.body`` None: header changes, early rejection, choosing what to do.
* Metadata written by a chunk hook (``ctx.metadata``) is seen by later policies, by their
  chunk hooks, and by the response phase; Envoy receives the listed keys as dynamic
  metadata with the reply that ends the stream.
* A hook that raises, times out (``timeout``, per call), returns something else, holds more
  than ``max_held_bytes`` or holds at the end of the stream fails per ``onError``:
  ``failOpen`` releases what it held and lets the rest of the body pass it by;
  ``failClosed`` answers ``errorStatus`` (once response headers have gone to the client,
  Envoy resets the stream instead: the client sees an incomplete response, never a
  silently cut one).
* A request or response without a body never reaches the chunk hook.

The chain decides: a phase streams when every enforced entry that needs that phase's body
has its chunk hook (and none of them is ``mode: shadow``); otherwise the body is buffered
as before and ``on_request``/``on_response`` see it whole (:func:`streams`). Several
streaming policies form a pipeline in chain order: each has its own framer, and what one
sends on is the next one's input. What a stream holds is bounded by what the policies hold
(the sum of their ``max_held_bytes``) plus the pieces in flight (Envoy's pieces of up to
its buffer limit, in gRPC's windows), never by the body size.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, TypeAlias, runtime_checkable

from engine import metrics, timing
from engine.chain import ChainPolicy, failure_response
from engine.errors import ConditionEvaluationError, PolicyError
from engine.framing import FRAMINGS, Framer, FramingKind, SseEvent, Unit
from engine.metadata import CURRENT_POLICY
from engine.policy import ImmediateResponse, RequestContext, ResponseContext

__all__ = [
    "DEFAULT_MAX_HELD_BYTES",
    "BodyStream",
    "Chunk",
    "ChunkResult",
    "EndStream",
    "Framing",
    "Hold",
    "Side",
    "StreamStep",
    "StreamsRequestBody",
    "StreamsResponseBody",
    "streams",
]

logger: Final = logging.getLogger("engine.streaming")

Side: TypeAlias = Literal["request", "response"]

DEFAULT_MAX_HELD_BYTES: Final = 64 * 1024
"""What a streaming policy may hold back by default (an unfinished unit plus kept bytes)."""


@dataclass(frozen=True, slots=True)
class Framing:
    """How a policy wants its body cut: ``kind`` (``bytes``, ``lines`` or ``sse``) and the
    most it may hold back at once (``max_held_bytes``)."""

    kind: FramingKind = "bytes"
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES

    def __post_init__(self) -> None:
        if self.kind not in FRAMINGS:
            raise ValueError(f"unknown framing {self.kind!r} (one of {', '.join(FRAMINGS)})")
        if isinstance(self.max_held_bytes, bool) or not isinstance(self.max_held_bytes, int):
            raise TypeError("max_held_bytes must be an int")
        if self.max_held_bytes < 1:
            raise ValueError("max_held_bytes must be at least 1")


@dataclass(slots=True)
class Chunk:
    """One unit of a streamed body, as a chunk hook receives it."""

    data: bytes
    end_of_stream: bool
    event: SseEvent | None = None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hold:
    """Send ``emit`` now; ``keep`` comes back at the start of the next unit's data."""

    emit: bytes = b""
    keep: bytes = b""


@dataclass(frozen=True, slots=True)
class EndStream:
    """Response bodies: send ``final`` and end the body there (the rest never comes)."""

    final: bytes = b""


ChunkResult: TypeAlias = bytes | Hold | EndStream | ImmediateResponse | None


@runtime_checkable
class StreamsRequestBody(Protocol):
    """A policy that processes the request body as it streams."""

    def on_request_chunk(
        self, ctx: RequestContext, chunk: Chunk
    ) -> ChunkResult | Awaitable[ChunkResult]: ...


@runtime_checkable
class StreamsResponseBody(Protocol):
    """A policy that processes the response body as it streams."""

    def on_response_chunk(
        self, ctx: ResponseContext, chunk: Chunk
    ) -> ChunkResult | Awaitable[ChunkResult]: ...


_HOOKS: Final[dict[str, str]] = {"request": "on_request_chunk", "response": "on_response_chunk"}


def _needs_body(policy: ChainPolicy, side: Side) -> bool:
    return policy.requires_request_body if side == "request" else policy.requires_response_body


def streams(policies: Iterable[ChainPolicy], side: Side) -> bool:
    """Whether ``side``'s body streams for a chain of ``policies``: some entry needs the
    body, and every entry that does has the chunk hook (and runs that phase, enforced)."""
    body_policies = [p for p in policies if _needs_body(p, side)]
    hook = _HOOKS[side]
    return bool(body_policies) and all(
        not p.shadow
        and (p.has_request if side == "request" else p.has_response)
        and callable(getattr(p.instance, hook, None))
        for p in body_policies
    )


@dataclass(frozen=True, slots=True)
class StreamStep:
    """What to do after one piece: send ``data`` on (``end``: it ends the body), or answer
    ``immediate`` instead (fail closed, or a request policy's answer)."""

    data: bytes = b""
    end: bool = False
    immediate: ImmediateResponse | None = None


class _Failed(Exception):
    """A stage failed; carries the reason (already a PolicyError or the policy's own)."""


@dataclass(slots=True, eq=False)
class _Stage:
    policy: ChainPolicy
    framer: Framer
    max_held: int
    hook: Any
    state: dict[str, Any] = field(default_factory=dict)
    kept: bytes = b""
    bypass: bool = False
    nanoseconds: int = 0  # time in the chunk hook so far (timing chains only)

    @property
    def held(self) -> int:
        return self.framer.pending + len(self.kept)


class BodyStream:
    """One body streaming through the chain's streaming policies (one per stream and side).

    Built by :meth:`start` after the headers phase; :meth:`push` takes each piece Envoy
    sends (in order) and returns what to send on. Never raises for a policy's fault.
    """

    __slots__ = ("_ctx", "_route", "_side", "_stages", "_timed", "ended", "received", "sent")

    def __init__(
        self,
        route: str,
        side: Side,
        ctx: RequestContext | ResponseContext,
        stages: list[_Stage],
        *,
        timed: bool = False,
    ) -> None:
        self._route = route
        self._side = side
        self._ctx = ctx
        self._stages = stages
        self._timed = timed
        self.ended = False
        self.received = 0
        self.sent = 0

    @classmethod
    def start(
        cls,
        route: str,
        side: Side,
        policies: Iterable[ChainPolicy],
        ctx: RequestContext | ResponseContext,
        *,
        timed: bool = False,
    ) -> BodyStream | ImmediateResponse:
        """The stream for ``side``'s body: the entries needing that body whose condition
        holds and which want this body (``*_framing``), in chain order. A condition or a
        framing method that fails is that entry's failure (``onError``).

        ``timed`` (a ``debug: {timing: true}`` chain): each stage's time in its chunk hook
        is summed over the body and recorded in ``engine.timing`` when the body ends
        (engine/timing.py; ``desc=body`` or ``desc="response body"``)."""
        stages: list[_Stage] = []
        for policy in policies:
            if not _needs_body(policy, side):
                continue
            try:
                condition = policy.condition
                if condition is not None:
                    try:
                        runs = (
                            condition.evaluate_request(ctx)  # type: ignore[arg-type]
                            if side == "request"
                            else condition.evaluate_response(ctx)  # type: ignore[arg-type]
                        )
                    except ConditionEvaluationError as exc:
                        raise PolicyError(str(exc)) from None
                    if not runs:
                        continue
                chooser = getattr(policy.instance, f"{side}_framing", None)
                framing = Framing() if chooser is None else chooser(ctx)
                if framing is None:
                    continue
                if not isinstance(framing, Framing):
                    raise PolicyError(
                        f"{side}_framing returned {type(framing).__name__}, not a Framing"
                    )
            except Exception as exc:
                failure = _failure(route, policy, side, exc, _request_id(ctx))
                if failure is not None:
                    return failure
                continue
            hook = getattr(policy.instance, _HOOKS[side])
            stages.append(_Stage(policy, Framer(framing.kind), framing.max_held_bytes, hook))
        return cls(route, side, ctx, stages, timed=timed)

    @property
    def held(self) -> int:
        """Bytes the policies hold right now (unfinished units and kept bytes)."""
        return sum(stage.held for stage in self._stages)

    async def push(self, data: bytes, end_of_stream: bool) -> StreamStep:
        """Run one piece through every stage; the bytes to send on now."""
        self.received += len(data)
        end = end_of_stream
        for stage in self._stages:
            if stage.bypass:
                continue
            try:
                data, cut = await self._run(stage, data, end)
            except _Failed as failed:
                failure = _failure(
                    self._route, stage.policy, self._side, failed.__cause__, _request_id(self._ctx)
                )
                if failure is not None:
                    self._end()
                    return StreamStep(immediate=failure)
                data = self._release(stage, failed.args[0])
                stage.bypass = True
                continue
            except _Immediate as answer:
                self._end()
                return StreamStep(immediate=answer.response)
            if cut:
                end = True
        if end:
            self._end()
        self.sent += len(data)
        return StreamStep(data, end)

    def _end(self) -> None:
        self.ended = True
        if not self._timed:
            return
        response = self._side == "response"
        for stage in self._stages:
            timing.record(
                self._ctx.metadata,
                stage.policy.name,
                stage.nanoseconds,
                response=response,
                shadow=stage.policy.shadow,
                body=True,
            )

    @staticmethod
    def _release(stage: _Stage, before: bytes) -> bytes:
        """A stage that failed open: what it already let through, then everything it held."""
        rest = stage.kept + (stage.framer.finish() or Unit(b"")).data
        stage.kept = b""
        return before + rest

    async def _run(self, stage: _Stage, data: bytes, end: bool) -> tuple[bytes, bool]:
        """``data`` through one stage: (bytes sent on, whether the policy ended the body).
        Raises _Failed(what was already sent on) from the policy's fault."""
        units = stage.framer.feed(data)
        if end:
            last = stage.framer.finish()
            if last is not None:
                units.append(last)
            if not units:
                units.append(Unit(b""))  # the hook always sees the end
        out: list[bytes] = []
        current = b""  # the unit being handled, until the policy has answered for it
        index = 0
        try:
            if stage.held > stage.max_held:
                raise PolicyError(f"holds {stage.held} bytes, over max_held_bytes")
            while index < len(units):
                unit = units[index]
                index += 1
                last_unit = end and index == len(units)
                current = stage.kept + unit.data
                stage.kept = b""
                call = self._timed_call if self._timed else self._call
                result = await call(stage, Chunk(current, last_unit, unit.event, stage.state))
                if result is None:
                    out.append(current)
                elif isinstance(result, bytes | bytearray | memoryview):
                    out.append(bytes(result))
                elif isinstance(result, Hold):
                    if last_unit and result.keep:
                        raise PolicyError("held bytes at the end of the stream")
                    out.append(bytes(result.emit))
                    stage.kept = bytes(result.keep)
                elif isinstance(result, EndStream) and self._side == "response":
                    out.append(bytes(result.final))
                    stage.framer.finish()
                    return b"".join(out), True
                elif isinstance(result, ImmediateResponse) and self._side == "request":
                    _check_status(result)
                    raise _Immediate(result)
                else:
                    raise PolicyError(
                        f"{_HOOKS[self._side]} returned {type(result).__name__}, "
                        f"not a {self._side} chunk result"
                    )
                current = b""
                if stage.held > stage.max_held:
                    raise PolicyError(f"holds {stage.held} bytes, over max_held_bytes")
        except (_Immediate, asyncio.CancelledError):
            raise
        except Exception as exc:
            # Failing open releases what the policy never answered for, in order.
            stage.kept += current + b"".join(u.data for u in units[index:])
            raise _Failed(b"".join(out)) from exc
        return b"".join(out), False

    async def _timed_call(self, stage: _Stage, chunk: Chunk) -> object:
        started = time.perf_counter_ns()
        try:
            return await self._call(stage, chunk)
        finally:
            stage.nanoseconds += time.perf_counter_ns() - started

    async def _call(self, stage: _Stage, chunk: Chunk) -> object:
        policy = stage.policy
        writer = CURRENT_POLICY.set(policy.label)
        try:
            result = stage.hook(self._ctx, chunk)
            if not inspect.isawaitable(result):
                return result
            if policy.timeout is None:
                return await result
            deadline = asyncio.timeout(policy.timeout)
            try:
                async with deadline:
                    return await result
            except TimeoutError:
                if deadline.expired():
                    raise PolicyError(f"timed out after {policy.timeout:g}s") from None
                raise
        finally:
            CURRENT_POLICY.reset(writer)


class _Immediate(Exception):  # an answer, not an error
    def __init__(self, response: ImmediateResponse) -> None:
        super().__init__(response.status)
        self.response = response


def _check_status(response: ImmediateResponse) -> None:
    if not 200 <= response.status <= 599:
        raise PolicyError(f"immediate response status {response.status} outside 200-599")


def _request_id(ctx: RequestContext | ResponseContext) -> str:
    return ctx.request_id if isinstance(ctx, RequestContext) else ctx.request.request_id


def _failure(
    route: str, policy: ChainPolicy, side: Side, exc: BaseException | None, request_id: str
) -> ImmediateResponse | None:
    """Log and count a streaming policy's failure; the answer if it fails closed."""
    if isinstance(exc, PolicyError):
        reason, kind, exc_info = f"failed: {exc}", "bad_result", None
        if str(exc).startswith("timed out"):
            kind = "timeout"
    elif exc is None:
        reason, kind, exc_info = "was cancelled", "cancelled", None
    else:
        reason, kind, exc_info = f"failed: {type(exc).__name__}: {exc}", "exception", exc
    metrics.policy_failed(route, policy.name, policy.version, kind)
    mode = "failOpen: passing the rest of the body" if policy.fail_open else "failClosed"
    log = logger.warning if policy.fail_open else logger.error
    log(
        "request %s: %s body stream: policy %s %s (%s)",
        request_id,
        side,
        policy.label,
        reason,
        mode,
        exc_info=exc_info,
    )
    return None if policy.fail_open else failure_response(policy)
