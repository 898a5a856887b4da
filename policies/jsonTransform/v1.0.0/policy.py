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
  A string holding an escaped lone surrogate (``"\\ud800"``) is not valid Unicode, so
  such a body is not valid JSON: a request gets the ``400``, a response passes
  unchanged (before, it parsed and then failed to serialise, failing the request).
* Only the top level of the body and the members an operation reaches INTO
  (``user`` for ``user.name``) are decoded; every other member is kept as its raw
  JSON text and written back byte for byte (whitespace, number spelling and escapes
  as the client sent them). That is what makes 100 KB bodies cheap (tools/bench:
  hotpath). The whole body is still checked to be well-formed JSON; a body that may
  hold what the check of a skipped member would miss (invalid UTF-8, an escaped lone
  surrogate) is decoded whole instead, so those bodies get the same outcome as
  before. A number beyond float range (``1e999``) in a skipped member is passed on as
  written (decoded, it is not valid JSON). The rewritten top level is written compactly
  (UTF-8, no ASCII escaping); only the body is changed (the engine fixes
  ``content-length``). When no operation changed anything the hook returns
  ``None``. Integers of any size and floats round-trip exactly.
* Bodies larger than ``maxBodyBytes`` (default 1 MiB) are not parsed: the hooks
  run on the event loop, and parsing is the cost (tens of ms per MiB here, while
  every other request waits). A worker thread does not help: msgspec, orjson and
  the standard library's C parser all hold the GIL while parsing (measured: a
  4.6 MiB body in ``asyncio.to_thread`` stalled the loop 214 ms of its 242 ms). A
  larger request body is answered ``413`` with ``{"error": "payload_too_large"}``;
  a larger response body fails the policy (``onError`` decides: by default the
  client gets the ``errorStatus``), because passing it unchanged could leak fields
  the policy is configured to remove.
* JSON is parsed and written with msgspec (3-5x faster than the standard library
  here; orjson, as fast, turns integers beyond 64 bits into floats).
* Configured ``set`` values are checked when the config loads: JSON types only,
  finite numbers, encodable strings, at most :data:`MAX_VALUE_NODES` nodes each
  (counted without expanding shared YAML aliases more than that), so neither the
  constructor nor a request does unbounded work on them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from engine.errors import PolicyError
from engine.policy import (
    ImmediateResponse,
    ParameterError,
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)

__all__ = ["MAX_VALUE_NODES", "Policy"]

_log = logging.getLogger(__name__)
_INDEX: Final = re.compile(r"[0-9]+")
_MISSING: Final = object()

MAX_VALUE_NODES: Final = 10_000
"""Most JSON nodes one configured ``set`` value may have."""


class _NotJsonObjectError(ValueError):
    pass


# The top level of the body, each member's value left as its raw JSON text: only the
# members an operation reaches into are decoded (see _Ops.apply).
_TOP_LEVEL: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
# Raw members are skipped over, not decoded, so two things the strict decode rejects go
# unseen inside them: invalid UTF-8 and escaped lone surrogates. A body that may hold
# either (the check over-approximates: any \\uD... escape) is decoded whole instead.
# (A number beyond float range in a skipped member passes as the client wrote it.)
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD]")


def _may_hold_surrogate(body: bytes) -> bool:
    # A backslash is rare in JSON bodies, and a one-byte search is memchr-fast; searching
    # for the escape itself is ~40x slower on 100 KB (bytes.find skips on its last byte).
    return b"\\" in body and _SURROGATE_ESCAPE.search(body) is not None


def _load_top_level(body: bytes) -> dict[str, Any]:
    """The body's top-level object, its member values raw (``msgspec.Raw``) unless the
    body needs the strict whole-body decode (then every value is decoded)."""
    if (body.isascii() or _is_utf8(body)) and not _may_hold_surrogate(body):
        try:
            return _TOP_LEVEL.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass  # the strict decode below says precisely what is wrong
    return _load_object(body)


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _strict_decode(data: bytes | msgspec.Raw) -> Any:
    """``data`` decoded whole, or :class:`_NotJsonObjectError` saying why it is not JSON."""
    try:
        return msgspec.json.decode(data)
    except RecursionError:
        raise _NotJsonObjectError("body is nested too deeply") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Also: invalid UTF-8, NaN/Infinity, lone surrogate escapes, numbers out of range.
        raise _NotJsonObjectError(f"body is not valid JSON: {exc}") from None


def _load_object(body: bytes) -> dict[str, Any]:
    value = _strict_decode(body)
    if not isinstance(value, dict):
        raise _NotJsonObjectError(f"body must be a JSON object, not {type(value).__name__}")
    return value


def _check_value(field: str, value: object) -> bytes:
    """``value`` encoded as JSON, or :class:`ParameterError` for anything that is not
    plain JSON data (bounded work: at most :data:`MAX_VALUE_NODES` nodes visited)."""
    stack = [value]
    nodes = 0
    while stack:
        node = stack.pop()
        nodes += 1
        if nodes > MAX_VALUE_NODES:
            raise ParameterError(field, f"value has more than {MAX_VALUE_NODES} JSON nodes")
        if isinstance(node, dict):
            if not all(isinstance(key, str) for key in node):
                raise ParameterError(field, "object keys must be strings")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise ParameterError(field, f"must be a finite number, got {node}")
        elif node is not None and not isinstance(node, str | int | float):
            raise ParameterError(field, f"{type(node).__name__} is not a JSON value")
    try:
        return msgspec.json.encode(value)
    except (UnicodeEncodeError, TypeError, OverflowError) as exc:
        raise ParameterError(field, f"cannot be written as JSON: {exc}") from exc


def _path(field: str, text: object) -> tuple[str, ...]:
    segments = tuple(text.split(".")) if isinstance(text, str) else ()
    if not segments or any(not segment for segment in segments):
        raise ParameterError(field, f"{text!r} is not a dotted path such as 'user.name'")
    return segments


def _decoded(value: object) -> object:
    """A member value as Python data (raw JSON text decoded, strictly)."""
    return _strict_decode(value) if isinstance(value, msgspec.Raw) else value


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


def _set(document: dict[str, Any], path: tuple[str, ...], value: _Value) -> bool:
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
        parent[last] = value.fresh()
        return True
    if isinstance(parent, list) and _INDEX.fullmatch(last) and int(last) < len(parent):
        parent[int(last)] = value.fresh()
        return True
    _log.debug("jsonTransform: cannot set %s: no such array element", ".".join(path))
    return False


@dataclass(frozen=True, slots=True)
class _Value:
    """A configured ``set`` value, checked and encoded once at config load."""

    value: Any
    encoded: bytes

    def fresh(self) -> Any:
        """A copy the document may own (later operations may change it in place):
        scalars as they are, containers decoded anew (faster than deepcopy)."""
        if isinstance(self.value, dict | list):
            return msgspec.json.decode(self.encoded)
        return self.value


@dataclass(frozen=True, slots=True)
class _Ops:
    """The validated operations of one phase."""

    remove: tuple[tuple[str, ...], ...]
    set: tuple[tuple[tuple[str, ...], _Value], ...]
    reached_into: frozenset[str] = frozenset()
    """Top-level members some path goes below: the only ones decoded per request."""

    @classmethod
    def parse(cls, phase: str, raw: Mapping[str, Any]) -> _Ops:
        removes: Sequence[object] = raw.get("remove") or ()
        sets: Mapping[str, Any] = raw.get("set") or {}
        parsed_sets = []
        for p, v in sets.items():
            field = f"{phase}.set.{p}"
            parsed_sets.append((_path(field, p), _Value(v, _check_value(field, v))))
        remove = tuple(_path(f"{phase}.remove[{i}]", p) for i, p in enumerate(removes))
        return cls(
            remove=remove,
            set=tuple(parsed_sets),
            reached_into=frozenset(
                path[0] for path in (*remove, *(p for p, _ in parsed_sets)) if len(path) > 1
            ),
        )

    def __bool__(self) -> bool:
        return bool(self.remove or self.set)

    def apply(self, body: bytes) -> bytes | None:
        """The transformed body, or ``None`` if nothing changed.

        Raises :class:`_NotJsonObjectError` when ``body`` is not a JSON object.
        """
        document = _load_top_level(body)
        for name in self.reached_into:
            if name in document:
                document[name] = _decoded(document[name])
        changed = False
        for path in self.remove:
            changed = _remove(document, path) or changed
        for path, value in self.set:
            changed = _set(document, path, value) or changed
        if not changed:
            return None
        return msgspec.json.encode(document)


class Policy:
    """Applies the configured JSON body changes; see the module docstring."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._request = _Ops.parse("request", params.get("request") or {})
        self._response = _Ops.parse("response", params.get("response") or {})
        if not self._request and not self._response:
            raise ParameterError("request", "configure set or remove for request, response or both")
        self._max_body = int(params.get("maxBodyBytes", 1 << 20))

    def phases(self) -> tuple[str, ...]:
        """The phases this configuration changes: Envoy buffers and sends only those bodies
        (a request-only transform costs 2 ext_proc messages instead of 4)."""
        return tuple(
            phase
            for phase, ops in (("request", self._request), ("response", self._response))
            if ops
        )

    def on_request(self, ctx: RequestContext) -> RequestModifications | ImmediateResponse | None:
        """Transform the request body; 400 if it is not a JSON object, 413 if it is
        larger than ``maxBodyBytes``."""
        if not self._request or not ctx.body:
            return None
        if len(ctx.body) > self._max_body:
            return _error(
                413, "payload_too_large", f"request body larger than {self._max_body} bytes"
            )
        try:
            body = self._request.apply(ctx.body)
        except _NotJsonObjectError as exc:
            return _error(400, "bad_request", f"request {exc}")
        return None if body is None else RequestModifications(body=body)

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        """Transform the response body; a non-JSON-object body passes unchanged; one
        larger than ``maxBodyBytes`` raises :class:`~engine.errors.PolicyError`."""
        if not self._response or not ctx.body:
            return None
        if len(ctx.body) > self._max_body:
            raise PolicyError(
                f"response body of {len(ctx.body)} bytes is larger than maxBodyBytes "
                f"({self._max_body}): not transformed"
            )
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


def _error(status: int, error: str, message: str) -> ImmediateResponse:
    return ImmediateResponse(
        status=status,
        headers={"content-type": "application/json"},
        body=json.dumps({"error": error, "message": message}).encode(),
    )
