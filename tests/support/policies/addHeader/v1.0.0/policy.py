"""Test-only policy: a plain (sync) hook that sets or appends one header."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import ParameterError, RequestContext, RequestModifications


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        if "\n" in params["value"]:
            raise ParameterError("value", "must not contain a newline")
        self.header: str = params["header"]
        self.value: str = params["value"]
        self.append: bool = params["append"]
        self.metadata_key: str | None = params.get("metadataKey")

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        if self.metadata_key is not None:
            ctx.metadata[self.metadata_key] = self.value
        if self.append:
            return RequestModifications(append_headers={self.header: self.value})
        return RequestModifications(set_headers={self.header: self.value})
