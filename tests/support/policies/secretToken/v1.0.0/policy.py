"""Test-only policy with secret parameters; its errors quote them (see the definition)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import ParameterError, RequestContext


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        token = params["token"]
        if token.startswith("revoked"):
            raise ParameterError("token", f"{token!r} is revoked")
        if token.startswith("crash"):
            raise RuntimeError(f"cannot use token {token}")
        self.token: str = token

    def on_request(self, ctx: RequestContext) -> None:
        return None
