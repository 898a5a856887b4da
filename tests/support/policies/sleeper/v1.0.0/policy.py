"""Test-only policy: an async hook that sleeps, to exercise per-policy timeouts."""

from __future__ import annotations

import asyncio
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
        self.seconds: float = params["seconds"]

    async def on_request(self, ctx: RequestContext) -> RequestModifications:
        await asyncio.sleep(self.seconds)
        return RequestModifications(set_headers={"x-slept": "yes"})

    async def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        await asyncio.sleep(self.seconds)
        return ResponseModifications(set_headers={"x-slept": "yes"})
