"""E2E test-only: appends header values in both phases (see the definition)."""

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
        self.request: Mapping[str, str] | None = params.get("request")
        self.response: Mapping[str, str] | None = params.get("response")

    def on_request(self, ctx: RequestContext) -> RequestModifications | None:
        if self.request is None:
            return None
        name = self.request["header"]
        seen = str(len(ctx.headers.get_all(name)))
        return RequestModifications(
            set_headers={"x-seen-values": seen},
            append_headers={name: self.request["value"]},
        )

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        if self.response is None:
            return None
        return ResponseModifications(
            append_headers={self.response["header"]: self.response["value"]}
        )
