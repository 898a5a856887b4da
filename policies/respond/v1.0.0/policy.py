"""respond v1.0.0: answer the request immediately with a configured response.

Contract: ``status`` (200-599, default 200), ``headers`` (name -> value) and
``body`` (text, sent UTF-8 encoded) are fixed at config time; every request gets
the same :class:`ImmediateResponse`, so the chain stops and the upstream is never
contacted. Header names must be HTTP tokens and values free of CR, LF and NUL
(:class:`ParameterError` names the offending header otherwise); names are
lower-cased, and two names that differ only in case are rejected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from engine.policy import ImmediateResponse, ParameterError, RequestContext

__all__ = ["Policy"]

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FORBIDDEN_IN_VALUE: Final = re.compile(r"[\r\n\x00]")


def _headers(raw: Mapping[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw.items():
        field = f"headers.{name}"
        if _TOKEN.fullmatch(name) is None:
            raise ParameterError(field, f"{name!r} is not a valid header name (an HTTP token)")
        if not isinstance(value, str) or _FORBIDDEN_IN_VALUE.search(value):
            raise ParameterError(field, "header value must be a string without CR, LF or NUL")
        if name.lower() in headers:
            raise ParameterError(field, f"header {name.lower()!r} is configured twice")
        headers[name.lower()] = value
    return headers


class Policy:
    """Returns the configured immediate response for every request."""

    # Constructing reads nothing from the host: the control plane may run it too.
    pure_constructor = True

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """The answer given to every request it runs for."""
        body = str(params["body"])
        return {
            "answers": int(params["status"]),
            "headers": {str(k).lower(): v for k, v in params["headers"].items()},
            "body": body if len(body) <= 200 else body[:200] + "...",
            "upstream": "never contacted",
        }

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._response = ImmediateResponse(
            status=int(params["status"]),
            headers=MappingProxyType(_headers(params["headers"])),
            body=str(params["body"]).encode("utf-8"),
        )

    def static_request(self) -> ImmediateResponse:
        """The same answer for every request, validated once at config load."""
        return self._response

    def on_request(self, ctx: RequestContext) -> ImmediateResponse:
        """The configured response; the request itself is not inspected."""
        return self._response
