"""setHeader v1.0.0: set, append or remove request and response headers.

Contract: parameters are ``{"request": ops, "response": ops}`` (either may be
omitted, not both) where ``ops`` is ``{"set": {name: value}, "append": {name:
value}, "remove": [name]}``. At config time every header name must be an HTTP
token (RFC 9110 ``tchar``) and every value free of CR, LF and NUL, so that no
configuration can smuggle an extra header line; names are lower-cased, and a
name may appear in only one operation per phase (``set`` and ``remove`` of the
same header would be order-dependent). The hooks are pure and return the same
modifications for every request, so the policy also declares them as static
(``static_request`` / ``static_response``, see engine/policy.py): the engine validates
them once, drops a phase with no operations, and answers a route made only of such
policies from replies built once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from engine.policy import (
    ParameterError,
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)

__all__ = ["Policy"]

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FORBIDDEN_IN_VALUE: Final = re.compile(r"[\r\n\x00]")


def _header_name(field: str, name: object) -> str:
    if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
        raise ParameterError(field, f"{name!r} is not a valid header name (an HTTP token)")
    return name.lower()


def _header_value(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ParameterError(field, "header value must be a string")
    if _FORBIDDEN_IN_VALUE.search(value):
        raise ParameterError(field, "header value must not contain CR, LF or NUL")
    return value


@dataclass(frozen=True, slots=True)
class _Ops:
    """The validated, lower-cased header operations of one phase."""

    set: Mapping[str, str]
    append: Mapping[str, str]
    remove: tuple[str, ...]


def _parse_ops(phase: str, raw: Mapping[str, Any]) -> _Ops:
    seen: dict[str, str] = {}

    def claim(name: str, op: str, field: str) -> None:
        if name in seen:
            raise ParameterError(
                field,
                f"header {name!r} already appears in {phase}.{seen[name]} "
                "(header names are case-insensitive)",
            )
        seen[name] = op

    maps: dict[str, dict[str, str]] = {}
    for op in ("set", "append"):
        parsed: dict[str, str] = {}
        entries: Mapping[str, Any] = raw.get(op) or {}
        for raw_name, raw_value in entries.items():
            field = f"{phase}.{op}.{raw_name}"
            name = _header_name(field, raw_name)
            claim(name, op, field)
            parsed[name] = _header_value(field, raw_value)
        maps[op] = parsed
    removed: list[str] = []
    names: Sequence[Any] = raw.get("remove") or ()
    for index, raw_name in enumerate(names):
        field = f"{phase}.remove[{index}]"
        name = _header_name(field, raw_name)
        claim(name, "remove", field)
        removed.append(name)
    # Read-only views: the same action object answers every request.
    return _Ops(
        set=MappingProxyType(maps["set"]),
        append=MappingProxyType(maps["append"]),
        remove=tuple(removed),
    )


class Policy:
    """Applies the configured header operations; see the module docstring."""

    # Constructing reads nothing from the host: the control plane may run it too.
    pure_constructor = True

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """The header operations of each phase, as configured (names lower-cased)."""
        said: dict[str, Any] = {}
        for phase in ("request", "response"):
            ops = params.get(phase) or {}
            shown = {
                op: {str(k).lower(): v for k, v in ops[op].items()}
                if op != "remove"
                else [str(n).lower() for n in ops[op]]
                for op in ("set", "append", "remove")
                if ops.get(op)
            }
            if shown:
                said[phase] = shown
        return said

    def __init__(self, params: Mapping[str, Any]) -> None:
        if not params.get("request") and not params.get("response"):
            raise ParameterError(
                "request", "configure header operations for request, response or both"
            )
        request = _parse_ops("request", params.get("request") or {})
        response = _parse_ops("response", params.get("response") or {})
        self._request = (
            RequestModifications(
                set_headers=request.set,
                append_headers=request.append,
                remove_headers=request.remove,
            )
            if request.set or request.append or request.remove
            else None
        )
        self._response = (
            ResponseModifications(
                set_headers=response.set,
                append_headers=response.append,
                remove_headers=response.remove,
            )
            if response.set or response.append or response.remove
            else None
        )

    def static_request(self) -> RequestModifications | None:
        """The same changes for every request, known at config load (the engine then
        answers from a reply built once); ``None``: no request operations configured."""
        return self._request

    def static_response(self) -> ResponseModifications | None:
        """Likewise for responses; ``None`` keeps Envoy from sending them for this policy."""
        return self._response

    def on_request(self, ctx: RequestContext) -> RequestModifications | None:
        """The configured request changes (``None`` when there are none)."""
        return self._request

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        """The configured response changes (``None`` when there are none)."""
        return self._response
