"""Test-only policy: fails on purpose (raises, or returns something invalid)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from engine.policy import RequestContext, RequestModifications, ResponseContext


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.mode: str = params["mode"]

    def _fail(self) -> Any:
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "timeout":  # its own timeout, not the engine's
            raise TimeoutError("upstream slow")
        if self.mode == "cancel":
            raise asyncio.CancelledError
        if self.mode == "badHeader":
            return RequestModifications(set_headers={"x-n": 1})  # type: ignore[dict-item]
        return "not an action"

    async def on_request(self, ctx: RequestContext) -> Any:
        return self._fail()

    async def on_response(self, ctx: ResponseContext) -> Any:
        return self._fail()
