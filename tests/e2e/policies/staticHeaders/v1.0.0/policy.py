"""E2E test-only: fixed header changes declared static (see the definition)."""

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
        request, response = params.get("request"), params.get("response")
        self._request = RequestModifications(set_headers=dict(request)) if request else None
        self._response = ResponseModifications(set_headers=dict(response)) if response else None

    def static_request(self) -> RequestModifications | None:
        return self._request

    def static_response(self) -> ResponseModifications | None:
        return self._response

    def on_request(self, ctx: RequestContext) -> None:
        raise AssertionError("the engine called a static policy's on_request")

    def on_response(self, ctx: ResponseContext) -> None:
        raise AssertionError("the engine called a static policy's on_response")
