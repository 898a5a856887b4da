"""Test-only policy: reads what earlier policies wrote to metadata."""

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
        self.key: str = params["key"]

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        value = str(ctx.metadata.get(self.key, "<none>"))
        return RequestModifications(set_headers={f"x-meta-{self.key}": value})

    def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        value = str(ctx.metadata.get(self.key, "<none>"))
        return ResponseModifications(set_headers={f"x-meta-{self.key}": value})
