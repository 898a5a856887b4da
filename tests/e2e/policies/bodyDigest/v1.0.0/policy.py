"""E2E test-only: digest of a streamed request body into metadata (see the definition)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from engine.policy import (
    ImmediateResponse,
    RequestContext,
    ResponseContext,
    ResponseModifications,
)
from engine.streaming import Chunk

__all__ = ["Policy"]


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self._max = int(params.get("maxBytes", 1 << 40))

    def on_request(self, ctx: RequestContext) -> None:
        return None

    def on_request_chunk(self, ctx: RequestContext, chunk: Chunk) -> ImmediateResponse | None:
        digest = chunk.state.setdefault("sha256", hashlib.sha256())
        digest.update(chunk.data)
        size = chunk.state["bytes"] = chunk.state.get("bytes", 0) + len(chunk.data)
        if size > self._max:
            return ImmediateResponse(status=413, body=b"too large\n")
        if chunk.end_of_stream:
            ctx.metadata["bodyDigest.sha256"] = digest.hexdigest()
            ctx.metadata["bodyDigest.bytes"] = size
        return None

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        if "bodyDigest.sha256" not in ctx.metadata:
            return None
        return ResponseModifications(
            set_headers={
                "x-body-sha256": str(ctx.metadata["bodyDigest.sha256"]),
                "x-body-bytes": str(ctx.metadata["bodyDigest.bytes"]),
            }
        )
