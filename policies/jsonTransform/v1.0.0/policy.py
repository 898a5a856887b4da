"""jsonTransform v1.0.0: set or remove fields of JSON request and response bodies.

Contract:

* ``request`` / ``response`` each hold ``set`` (dotted path -> JSON value) and
  ``remove`` (dotted paths). Removals run first, then sets, in configured order.
  A path segment addresses an object member; a segment of digits addresses an
  element of an existing array (``items.0.id``). ``set`` creates missing
  intermediate objects; an operation whose path runs into a scalar, or past the
  end of an array, is skipped (logged at debug level). Removing a missing path is
  a no-op.
* Only a body that parses as a JSON *object* is transformed. A request body that
  does not is answered ``400`` with ``{"error": "bad_request", "message": ...}``
  (the upstream is not contacted). A response body that does not (an upstream HTML
  error page, a compressed body) is passed through unchanged and logged at
  warning level: failing the response with a 502 would hide the upstream's real
  answer. An absent or empty body is left alone. ``NaN``/``Infinity`` are not JSON.
* A transformed body is re-serialised compactly (UTF-8, no ASCII escaping); only
  the body is changed (the engine fixes ``content-length``). When no operation
  changed anything the hook returns ``None``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from engine.policy import (
    ImmediateResponse,
    ParameterError,
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)

__all__ = ["Policy"]

_log = logging.getLogger(__name__)
_INDEX: Final = re.compile(r"[0-9]+")
_MISSING: Final = object()


class _NotJsonObjectError(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise _NotJsonObjectError("body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _NotJsonObjectError(f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _NotJsonObjectError(f"body must be a JSON object, not {type(value).__name__}")
    return value


def _path(field: str, text: object) -> tuple[str, ...]:
    segments = tuple(text.split(".")) if isinstance(text, str) else ()
    if not segments or any(not segment for segment in segments):
        raise ParameterError(field, f"{text!r} is not a dotted path such as 'user.name'")
    return segments


def _child(container: object, segment: str) -> object:
    if isinstance(container, dict):
        return container.get(segment, _MISSING)
    if isinstance(container, list) and _INDEX.fullmatch(segment):
        index = int(segment)
        return container[index] if index < len(container) else _MISSING
    return _MISSING


def _remove(document: dict[str, Any], path: tuple[str, ...]) -> bool:
    parent: object = document
    for segment in path[:-1]:
        parent = _child(parent, segment)
    last = path[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
        return True
    if isinstance(parent, list) and _INDEX.fullmatch(last) and int(last) < len(parent):
        del parent[int(last)]
        return True
    return False


def _set(document: dict[str, Any], path: tuple[str, ...], value: Any) -> bool:
    parent: object = document
    for segment in path[:-1]:
        child = _child(parent, segment)
        if child is _MISSING and isinstance(parent, dict):
            child = parent[segment] = {}
        if not isinstance(child, dict | list):
            _log.debug("jsonTransform: cannot set %s: %s is not an object", ".".join(path), segment)
            return False
        parent = child
    last = path[-1]
    if isinstance(parent, dict):
        parent[last] = copy.deepcopy(value)
        return True
    if isinstance(parent, list) and _INDEX.fullmatch(last) and int(last) < len(parent):
        parent[int(last)] = copy.deepcopy(value)
        return True
    _log.debug("jsonTransform: cannot set %s: no such array element", ".".join(path))
    return False


@dataclass(frozen=True, slots=True)
class _Ops:
    """The validated operations of one phase."""

    remove: tuple[tuple[str, ...], ...]
    set: tuple[tuple[tuple[str, ...], Any], ...]

    @classmethod
    def parse(cls, phase: str, raw: Mapping[str, Any]) -> _Ops:
        removes: Sequence[object] = raw.get("remove") or ()
        sets: Mapping[str, Any] = raw.get("set") or {}
        return cls(
            remove=tuple(_path(f"{phase}.remove[{i}]", p) for i, p in enumerate(removes)),
            set=tuple((_path(f"{phase}.set.{p}", p), v) for p, v in sets.items()),
        )

    def __bool__(self) -> bool:
        return bool(self.remove or self.set)

    def apply(self, body: bytes) -> bytes | None:
        """The transformed body, or ``None`` if nothing changed.

        Raises :class:`_NotJsonObjectError` when ``body`` is not a JSON object.
        """
        document = _load_object(body)
        changed = False
        for path in self.remove:
            changed = _remove(document, path) or changed
        for path, value in self.set:
            changed = _set(document, path, value) or changed
        if not changed:
            return None
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


class Policy:
    """Applies the configured JSON body changes; see the module docstring."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._request = _Ops.parse("request", params.get("request") or {})
        self._response = _Ops.parse("response", params.get("response") or {})
        if not self._request and not self._response:
            raise ParameterError("request", "configure set or remove for request, response or both")
        for phase, ops in (("request", self._request), ("response", self._response)):
            for path, value in ops.set:
                try:
                    json.dumps(value, allow_nan=False)
                except ValueError as exc:
                    raise ParameterError(f"{phase}.set.{'.'.join(path)}", str(exc)) from exc

    def on_request(self, ctx: RequestContext) -> RequestModifications | ImmediateResponse | None:
        """Transform the request body; 400 if it is not a JSON object."""
        if not self._request or not ctx.body:
            return None
        try:
            body = self._request.apply(ctx.body)
        except _NotJsonObjectError as exc:
            message = json.dumps({"error": "bad_request", "message": f"request {exc}"})
            return ImmediateResponse(
                status=400, headers={"content-type": "application/json"}, body=message.encode()
            )
        return None if body is None else RequestModifications(body=body)

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        """Transform the response body; a non-JSON-object body passes unchanged."""
        if not self._response or not ctx.body:
            return None
        try:
            body = self._response.apply(ctx.body)
        except _NotJsonObjectError as exc:
            _log.warning(
                "jsonTransform: response of request %s left unchanged: %s",
                ctx.request.request_id,
                exc,
            )
            return None
        return None if body is None else ResponseModifications(body=body)
