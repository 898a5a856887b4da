"""E2E test-only: sets ``x-body-seen`` to ``none`` or the length of the body it received."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import RequestContext, RequestModifications


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        pass

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        seen = "none" if ctx.body is None else str(len(ctx.body))
        return RequestModifications(set_headers={"x-body-seen": seen})
