"""Test-only policy: an async hook that short-circuits with an ImmediateResponse."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engine.policy import ImmediateResponse, RequestContext


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.status: int = params["status"]
        self.body = json.dumps({"error": params["message"]}).encode()

    async def on_request(self, ctx: RequestContext) -> ImmediateResponse:
        return ImmediateResponse(
            status=self.status, headers={"content-type": "application/json"}, body=self.body
        )
