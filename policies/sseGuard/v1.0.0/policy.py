"""sseGuard v1.0.0: mask (or block on) patterns in streamed SSE and NDJSON responses.

Contract:

* A streaming policy (engine/streaming.py): the response body flows through
  :meth:`Policy.on_response_chunk` one whole unit at a time: an SSE event for
  ``text/event-stream``, a line for NDJSON (``application/x-ndjson``,
  ``application/ndjson``, ``application/jsonl``, ``application/x-jsonlines``). The
  engine's framing reassembles a unit split across network chunks, so a pattern split
  across two chunks is matched; a unit goes on as soon as it is complete (events that
  cannot contain a match are never delayed beyond their own end). Other content types
  pass untouched (``response_framing`` returns None).
* ``mask`` (regexes) and ``builtins`` (``email``, ``cardNumber``) are replaced by
  ``replacement``, matched on the raw bytes of each unit (bytes regexes: ``\\w`` is
  ASCII). The number of masked matches so far is in metadata ``sseGuard.masked``.
* ``block``: when one appears in a unit, that unit is NOT sent; the stream ends with a
  final unit (SSE: ``event: blocked`` with ``blockEvent`` as data; NDJSON: ``blockEvent``
  as a line) and metadata ``sseGuard.blocked`` is true. The client sees a complete
  response; Envoy cuts the upstream off.
* A unit larger than ``maxEventBytes`` while incomplete fails the policy (``onError``).
* An SSE or NDJSON body with a ``content-encoding`` other than ``identity`` (gzip, br,
  ...) fails the policy (``onError``) at the response headers: its patterns cannot be
  matched in coded bytes, and passing it would send every masked or blocked pattern on.
  So every request gets ``accept-encoding: identity`` (static), and an upstream that
  honours it never compresses what the policy reads.
* When the chain buffers the response instead (another body policy of the route has no
  chunk hook), ``on_response`` applies the same rules to the whole body.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from engine.errors import PolicyError
from engine.framing import Framer, FramingKind
from engine.policy import (
    ParameterError,
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)
from engine.streaming import Chunk, EndStream, Framing

__all__ = ["Policy"]

BUILTINS: Final = {
    # Bounded parts (RFC 5321: local part <= 64, domain <= 255 octets): with unbounded
    # ones a search retried from every byte of a run of letters scanned to its end each
    # time, quadratic in the event size (a 64 KiB event of letters: ~7 s of event loop).
    # A local part over 64 characters is masked from its last 64 on.
    "email": rb"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}",
    # 13 to 19 digits, optionally grouped by spaces or dashes (PAN lengths).
    "cardNumber": rb"(?<![0-9])(?:[0-9][ -]?){12,18}[0-9](?![0-9])",
}
# Set on every request: the upstream must answer uncoded for the patterns to be matched.
IDENTITY: Final = RequestModifications(set_headers={"accept-encoding": "identity"})
SSE_TYPES: Final = frozenset({"text/event-stream"})
NDJSON_TYPES: Final = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)


def _compile(field: str, patterns: list[str]) -> list[re.Pattern[bytes]]:
    compiled = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern.encode("utf-8")))
        except re.error as exc:
            raise ParameterError(
                f"{field}.{index}", f"not a valid regular expression: {exc}"
            ) from None
    return compiled


def _media_type(ctx: ResponseContext) -> str:
    return ctx.headers.get("content-type", "").split(";")[0].strip().lower()


def _coding(ctx: ResponseContext) -> str:
    """The response's content codings other than ``identity`` ("" when it has none)."""
    header = ",".join(ctx.headers.get_all("content-encoding"))
    codings = (c.strip().lower() for c in header.split(","))
    return ", ".join(c for c in codings if c and c != "identity")


class Policy:
    """Masks and blocks patterns per SSE event / NDJSON line."""

    pure_constructor = True

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """The patterns it masks and blocks in streamed SSE / NDJSON responses."""
        return {
            "masks": list(params["mask"]) + list(params["builtins"]),
            "replacement": params["replacement"],
            "blocks": list(params["block"]),
            "onBlock": "the stream ends with a final event carrying blockEvent",
            "maxEventBytes": params["maxEventBytes"],
            "writesMetadata": ["sseGuard.masked", "sseGuard.blocked"],
            "setsRequestHeaders": {"accept-encoding": "identity"},
        }

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._mask = _compile("mask", list(params["mask"]))
        self._mask += [re.compile(BUILTINS[name]) for name in params["builtins"]]
        self._block = _compile("block", list(params["block"]))
        self._replacement = str(params["replacement"]).encode("utf-8")
        self._max_event = int(params["maxEventBytes"])
        text = str(params["blockEvent"])
        data = "".join(f"data: {line}\n" for line in text.split("\n"))
        self._final_sse = f"event: blocked\n{data}\n".encode()
        self._final_line = text.replace("\n", " ").encode("utf-8") + b"\n"

    def static_request(self) -> RequestModifications:
        """``accept-encoding: identity`` on every request (coded bodies fail the policy)."""
        return IDENTITY

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return IDENTITY

    def response_framing(self, ctx: ResponseContext) -> Framing | None:
        """Whole SSE events or NDJSON lines; None (pass untouched) for other bodies. A
        content-coded SSE or NDJSON body fails the policy (PolicyError: onError decides)."""
        media = _media_type(ctx)
        kind: FramingKind
        if media in SSE_TYPES:
            kind = "sse"
        elif media in NDJSON_TYPES:
            kind = "lines"
        else:
            return None
        coding = _coding(ctx)
        if coding:
            raise PolicyError(
                f"{media} response with content-encoding {coding!r}: patterns cannot be "
                "matched in coded bytes"
            )
        return Framing(kind, self._max_event)

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        """At the headers of a streamed body nothing to do; a buffered body (the chain
        could not stream) gets the same rules, unit by unit."""
        framing = self.response_framing(ctx)
        if ctx.body is None or framing is None:
            return None
        framer = Framer(framing.kind)
        units = framer.feed(ctx.body)
        last = framer.finish()
        if last is not None:
            units.append(last)
        state: dict[str, Any] = {}
        out: list[bytes] = []
        for unit in units:
            result = self._unit(ctx, unit.data, state, framing.kind == "sse")
            if isinstance(result, EndStream):
                out.append(result.final)
                break
            out.append(unit.data if result is None else result)
        body = b"".join(out)
        return None if body == ctx.body else ResponseModifications(body=body)

    def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> bytes | EndStream | None:
        """One whole event (or line): masked, passed, or the end of the stream."""
        return self._unit(ctx, chunk.data, chunk.state, _media_type(ctx) in SSE_TYPES)

    def _unit(
        self, ctx: ResponseContext, data: bytes, state: dict[str, Any], sse: bool
    ) -> bytes | EndStream | None:
        if not data:
            return None
        for pattern in self._block:
            if pattern.search(data):
                ctx.metadata["sseGuard.blocked"] = True
                return EndStream(self._final_sse if sse else self._final_line)
        masked = 0
        for pattern in self._mask:
            data, count = pattern.subn(self._replace, data)
            masked += count
        if not masked:
            return None
        state["masked"] = state.get("masked", 0) + masked
        ctx.metadata["sseGuard.masked"] = state["masked"]
        return data

    def _replace(self, _match: re.Match[bytes]) -> bytes:
        return self._replacement
