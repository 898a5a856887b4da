"""Test-only policy: rewrites the request line and drops headers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import RequestContext, RequestModifications


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.action = RequestModifications(
            path=params.get("path"),
            method=params.get("method"),
            remove_headers=tuple(params["removeHeaders"]),
        )

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return self.action
