"""Test-only policy: needs both bodies and rewrites them."""

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
        pass

    def on_request(self, ctx: RequestContext) -> RequestModifications | None:
        return None if ctx.body is None else RequestModifications(body=ctx.body.upper())

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        return None if ctx.body is None else ResponseModifications(body=ctx.body.upper())
