"""E2E test-only: sets the path and/or method to whatever it is configured with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import RequestContext, RequestModifications


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.action = RequestModifications(path=params.get("path"), method=params.get("method"))

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return self.action
