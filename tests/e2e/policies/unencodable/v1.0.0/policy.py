"""E2E test-only: removes ``header`` and sets it to a lone surrogate (not UTF-8 encodable)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import RequestContext, RequestModifications


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.header: str = params["header"]

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return RequestModifications(
            remove_headers=(self.header,), set_headers={self.header: "user-\ud800"}
        )
