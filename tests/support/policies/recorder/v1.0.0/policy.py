"""Test-only policy: records its calls so tests can assert order and what was seen.

``Policy.calls`` is class-level on purpose (test-only code): tests reach it through
the registry entry's factory and clear it before use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from engine.policy import RequestContext, ResponseContext


class Policy:
    calls: ClassVar[list[tuple[str, str, dict[str, str]]]] = []

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.label: str = params["label"]

    async def on_request(self, ctx: RequestContext) -> None:
        self.calls.append((self.label, "request", dict(ctx.headers)))

    async def on_response(self, ctx: ResponseContext) -> None:
        self.calls.append((self.label, "response", dict(ctx.headers)))
