"""E2E test-only: upper-cases the response body (needs only the response body)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import ResponseContext, ResponseModifications


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        pass

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        return None if ctx.body is None else ResponseModifications(body=ctx.body.upper())
