"""Test-only policy: a response-only policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import ResponseContext, ResponseModifications


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.status: int = params["status"]
        self.remove: tuple[str, ...] = (params["removeHeader"],) if "removeHeader" in params else ()

    async def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        return ResponseModifications(status=self.status, remove_headers=self.remove)
