"""E2E test-only: wraps bodies so their length changes (exercises content-length updates)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import (
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.prefix = params["prefix"].encode()
        self.suffix = params["suffix"].encode()

    def on_request(self, ctx: RequestContext) -> RequestModifications | None:
        if ctx.body is None:
            return None
        return RequestModifications(body=self.prefix + ctx.body + self.suffix)

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        if ctx.body is None:
            return None
        return ResponseModifications(body=self.prefix + ctx.body + self.suffix)
