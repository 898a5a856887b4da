"""llmUsage v1.0.0: token usage of OpenAI-compatible responses into metadata.

Contract:

* A streaming policy (engine/streaming.py) that never changes or delays the body:
  ``text/event-stream`` is framed as SSE events; an event whose data is a JSON object with
  a ``usage`` object sets the metadata (the last such event wins; ``[DONE]`` and other
  events are passed over). ``application/json`` (and ``+json``) pieces go on as they
  come while a copy (at most ``maxBodyBytes``) is kept in the stream's state and read at
  the end. Other content types are left alone.
* Metadata: ``llmUsage.promptTokens``, ``llmUsage.completionTokens``,
  ``llmUsage.totalTokens`` (ints, when present and integral) and ``llmUsage.model`` (the
  response's ``model`` string). Written at the event that carries the usage (SSE) or at
  the end of the body (JSON): Envoy receives listed keys with the reply ending the stream.
* No usage (absent, unparsable, too large) is not a failure: nothing is written.
* On a route that buffers the response, ``on_response`` reads the whole body the same way.
* Every request gets ``accept-encoding: identity`` (static): a content-coded answer (gzip,
  br) cannot be read, so the client's ``accept-encoding`` would decide whether usage is
  written (and, with rateLimit's ``costMetadataKey: llmUsage.totalTokens``, charged).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Final

from engine.framing import Framer
from engine.policy import RequestContext, RequestModifications, ResponseContext
from engine.streaming import Chunk, Framing

__all__ = ["Policy"]

log: Final = logging.getLogger(__name__)

# Set on every request: the upstream must answer uncoded for the usage to be read.
IDENTITY: Final = RequestModifications(set_headers={"accept-encoding": "identity"})

FIELDS: Final = (
    ("prompt_tokens", "llmUsage.promptTokens"),
    ("completion_tokens", "llmUsage.completionTokens"),
    ("total_tokens", "llmUsage.totalTokens"),
)


def _kind(ctx: ResponseContext) -> str | None:
    media = ctx.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "text/event-stream":
        return "sse"
    if media == "application/json" or media.endswith("+json"):
        return "json"
    return None


def record_usage(ctx: ResponseContext, document: object) -> bool:
    """Write the usage of one parsed response (or SSE event) object; whether it had one."""
    if not isinstance(document, dict):
        return False
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return False
    for name, key in FIELDS:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            ctx.metadata[key] = value
    model = document.get("model")
    if isinstance(model, str):
        ctx.metadata["llmUsage.model"] = model
    return True


def _parse(data: bytes | str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        log.debug("llmUsage: a body or event that is not JSON")
        return None


class Policy:
    """Reads usage; passes the body on untouched."""

    pure_constructor = True

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """What it reads and writes; it never changes the body."""
        return {
            "reads": "token usage of OpenAI-compatible responses (SSE events or JSON), "
            f"at most {params['maxBodyBytes']} bytes",
            "writesMetadata": [
                "llmUsage.promptTokens",
                "llmUsage.completionTokens",
                "llmUsage.totalTokens",
                "llmUsage.model",
            ],
            "body": "passed on unchanged",
            "setsRequestHeaders": {"accept-encoding": "identity"},
        }

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._max = int(params["maxBodyBytes"])

    def static_request(self) -> RequestModifications:
        """``accept-encoding: identity`` on every request (see the module docstring)."""
        return IDENTITY

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return IDENTITY

    def response_framing(self, ctx: ResponseContext) -> Framing | None:
        kind = _kind(ctx)
        if kind == "sse":
            return Framing("sse", self._max)
        if kind == "json":
            return Framing("bytes")
        return None

    def on_response(self, ctx: ResponseContext) -> None:
        """At the headers nothing; a buffered body (the route could not stream) is read whole."""
        if ctx.body is None or len(ctx.body) > self._max:
            return
        kind = _kind(ctx)
        if kind == "json":
            record_usage(ctx, _parse(ctx.body))
        elif kind == "sse":
            for unit in Framer("sse").feed(ctx.body):
                if unit.event is not None and unit.event.has_data:
                    self._event(ctx, unit.event.data.encode())

    def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> None:
        """One SSE event or one piece of a JSON body; the body goes on unchanged."""
        if "kind" not in chunk.state:
            chunk.state["kind"] = _kind(ctx)
        if chunk.state["kind"] == "sse":
            # (event None: the end of a stream never ended by a blank line, which a
            # client discards too)
            if chunk.event is not None and chunk.event.has_data:
                self._event(ctx, chunk.event.data.encode())
            return
        copy: bytearray | None = chunk.state.setdefault("copy", bytearray())
        if copy is not None:
            if len(copy) + len(chunk.data) > self._max:
                log.debug("llmUsage: JSON body over maxBodyBytes: no usage read")
                chunk.state["copy"] = None
            else:
                copy += chunk.data
        if chunk.end_of_stream and chunk.state.get("copy"):
            record_usage(ctx, _parse(bytes(chunk.state["copy"])))

    def _event(self, ctx: ResponseContext, data: bytes) -> None:
        if b'"usage"' not in data:  # most events: no parse at all
            return
        record_usage(ctx, _parse(data))
