"""E2E test-only: holds the whole streamed response body until its end (see the definition)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import ResponseContext
from engine.streaming import Chunk, Framing, Hold

__all__ = ["Policy"]


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        pass

    def on_response(self, ctx: ResponseContext) -> None:
        return None

    def response_framing(self, ctx: ResponseContext) -> Framing:
        return Framing("bytes", max_held_bytes=1 << 20)

    def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> Hold | bytes:
        if chunk.end_of_stream:
            return chunk.data  # everything held so far comes back as this chunk's data
        return Hold(keep=chunk.data)
