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
  (the upstream is not contacted). A response body the policy cannot read (not JSON:
  an HTML error page, ``NaN``, invalid UTF-8, an escaped lone surrogate ``"\\ud800"``;
  JSON whose top level is not an object, e.g. an array of users; an unsupported or
  broken content coding) FAILS THE POLICY: ``onError`` decides, by default the client
  gets ``errorStatus``. Passing it unchanged (as before) let a lenient client parser
  (Python's ``json`` reads ``NaN``, browsers strip a BOM) or a decompressing client
  read the very field the policy removes. ``onError: failOpen`` passes such responses
  unchanged, logged; a ``condition`` can limit the policy to the responses it is meant
  for. An absent or empty body is left alone. A leading UTF-8 byte order mark is
  stripped before parsing (RFC 8259 lets parsers ignore it; a rewritten body has none).
* Content codings (``content-encoding``) ``gzip`` (``x-gzip``) and ``deflate`` (zlib
  or raw), also stacked, are decoded in both phases; the decoded size is capped at
  ``maxBodyBytes`` (a zip bomb stops there: ``413`` for a request, a failure of the
  policy for a response). A body decoded and then rewritten is sent without coding:
  ``content-encoding`` removed, ``content-length`` fixed by the engine. A body that
  needs no change passes as it came (still compressed). Any other coding (``br``,
  ``zstd``, ``compress``) is not read: ``415`` for a request, a failure for a
  response. Up to 64 KiB of output is decoded inline; a body that inflates further is
  decoded in a worker thread (zlib releases the GIL), so a big one does not stall the
  event loop.
* Defence in depth: on a route that transforms responses the policy also runs in the
  request phase (headers only: it never buffers request bodies it does not transform)
  and sets ``accept-encoding: identity``, so the upstream does not compress in the
  first place. (With a STREAMED request body mode in Envoy's filter config, a route
  that transforms request bodies too cannot change that header after the body: the
  engine fails such requests closed; likewise a STREAMED response body mode with a
  coded response that must be rewritten, as ``content-encoding`` must go. Use body
  modes NONE or BUFFERED, as recommended.)
* Duplicate member names: the body forwarded is always the policy's own reading of it.
  msgspec keeps the LAST of duplicate names; a parser that keeps the first would read
  ``{"user": {"password": "s3cret"}, "user": "x"}`` differently. So whenever a member
  an operation reaches into exists (``user`` for ``user.password``), the body is
  rewritten even if no operation changed anything: that member and the top level are
  written from what the policy read, and every duplicate there collapses to the one
  the policy saw. (Before, "nothing changed" forwarded the original bytes and the
  password with them.) Bodies where no path reaches anything pass as they came.
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
  ``content-length``). When no operation changed anything and no member a path reaches
  into exists, the hook returns ``None``. Integers of any size and floats round-trip
  exactly.
* Bodies larger than ``maxBodyBytes`` (default 1 MiB) are not parsed: the hooks
  run on the event loop, and parsing is the cost (tens of ms per MiB here, while
  every other request waits). A worker thread does not help: msgspec, orjson and
  the standard library's C parser all hold the GIL while parsing (measured: a
  4.6 MiB body in ``asyncio.to_thread`` stalled the loop 214 ms of its 242 ms). A
  larger request body (as sent, or once decoded) is answered ``413`` with
  ``{"error": "payload_too_large"}``;
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

import asyncio
import json
import logging
import math
import re
import zlib
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from engine.errors import PolicyError
from engine.policy import (
    ImmediateResponse,
    ParameterError,
    RequestAction,
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)

__all__ = ["INLINE_DECODE_BYTES", "MAX_CODINGS", "MAX_VALUE_NODES", "Policy"]

_log = logging.getLogger(__name__)
_INDEX: Final = re.compile(r"[0-9]+")
_MISSING: Final = object()

MAX_VALUE_NODES: Final = 10_000
"""Most JSON nodes one configured ``set`` value may have."""


INLINE_DECODE_BYTES: Final = 64 * 1024
"""Most decoded bytes produced on the event loop; a body inflating further is decoded in a
worker thread (from the start: the inline attempt is thrown away, at most this much)."""

MAX_CODINGS: Final = 2
"""Most stacked content codings read (``deflate, gzip``); more is refused, not decoded."""

_BOM: Final = b"\xef\xbb\xbf"


class _UnreadableError(ValueError):
    """A body the policy cannot read; ``status``/``error`` answer it in the request phase."""

    status = 400
    error = "bad_request"


class _NotJsonObjectError(_UnreadableError):
    pass


class _UnsupportedCodingError(_UnreadableError):
    status = 415
    error = "unsupported_media_type"


class _TooLargeError(_UnreadableError):
    status = 413
    error = "payload_too_large"

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


def _codings(header: str | None) -> tuple[str, ...]:
    """The content codings of a ``content-encoding`` value, in the order applied
    (``identity`` dropped); :class:`_UnsupportedCodingError` for one not read here."""
    if not header:
        return ()
    codings = tuple(
        c for c in (part.strip().lower() for part in header.split(",")) if c and c != "identity"
    )
    for coding in codings:
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise _UnsupportedCodingError(
                f"content-encoding {coding!r} is not supported (gzip and deflate are)"
            )
    if len(codings) > MAX_CODINGS:
        raise _UnsupportedCodingError(
            f"content-encoding {header!r}: more than {MAX_CODINGS} stacked codings"
        )
    return codings


def _decode(body: bytes, codings: tuple[str, ...], limit: int) -> bytes:
    """``body`` with ``codings`` undone (last applied first), never more than ``limit``
    bytes produced by any step: :class:`_TooLargeError` past it (a zip bomb stops there),
    :class:`_NotJsonObjectError` for a broken or truncated stream or trailing garbage."""
    data = body
    for coding in reversed(codings):
        data = _inflate(data, coding, limit)
    return data


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    if coding == "deflate":
        # RFC 9110 deflate is zlib-wrapped; some servers send raw deflate. A zlib header
        # is method 8 with a check sum divisible by 31.
        zlib_wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        wbits = zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS
    else:
        wbits = 16 + zlib.MAX_WBITS  # gzip
    out: list[bytes] = []
    size = 0
    rest = data
    try:
        while True:  # one pass per gzip member (RFC 1952 allows several)
            inflater = zlib.decompressobj(wbits)
            chunk = inflater.decompress(rest, limit - size + 1)
            size += len(chunk)
            out.append(chunk)
            if size > limit or inflater.unconsumed_tail:
                raise _TooLargeError(f"body is larger than {limit} bytes once decoded", limit)
            if not inflater.eof:
                raise _NotJsonObjectError(f"body is not valid {coding}: the stream is truncated")
            rest = inflater.unused_data
            if not rest or wbits != 16 + zlib.MAX_WBITS:
                break
    except zlib.error as exc:
        raise _NotJsonObjectError(f"body is not valid {coding}: {exc}") from None
    if rest:
        raise _NotJsonObjectError(f"body is not valid {coding}: data after the end of the stream")
    return b"".join(out)


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
    body needs the strict whole-body decode (then every value is decoded). A leading
    UTF-8 byte order mark is skipped."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
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
        """The transformed body; ``None`` if nothing changed and no member a path reaches
        into exists (then the original says nothing the policy would read differently).

        Whenever such a member exists the body is written from what was read, changed or
        not: duplicate member names collapse to the one read (the last), so a parser
        keeping the first duplicate upstream or downstream reads what the policy did.
        Raises :class:`_NotJsonObjectError` when ``body`` is not a JSON object.
        """
        document = _load_top_level(body)
        reached = False
        for name in self.reached_into:
            if name in document:
                document[name] = _decoded(document[name])
                reached = True
        changed = False
        for path in self.remove:
            changed = _remove(document, path) or changed
        for path, value in self.set:
            changed = _set(document, path, value) or changed
        if not (changed or reached):
            return None
        return msgspec.json.encode(document)


class Policy:
    """Applies the configured JSON body changes; see the module docstring."""

    # Constructing reads nothing from the host: the control plane may run it too.
    pure_constructor = True

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """The configured body changes of each phase and the body size limit."""
        said: dict[str, Any] = {
            phase: params[phase] for phase in ("request", "response") if params.get(phase)
        }
        said["maxBodyBytes"] = params["maxBodyBytes"]
        said["readsBodies"] = [p for p in ("request", "response") if params.get(p)]
        return said

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._request = _Ops.parse("request", params.get("request") or {})
        self._response = _Ops.parse("response", params.get("response") or {})
        if not self._request and not self._response:
            raise ParameterError("request", "configure set or remove for request, response or both")
        self._max_body = int(params["maxBodyBytes"])

    def phases(self) -> tuple[str, ...]:
        """The phases this configuration acts in: the request phase when it transforms
        requests or responses (for responses it sets ``accept-encoding``), the response
        phase when it transforms responses. A request-only transform costs 2 ext_proc
        messages instead of 4."""
        return ("request", "response") if self._response else ("request",)

    def bodies(self) -> tuple[str, ...]:
        """The bodies this configuration reads: only those of the phases it transforms
        (a response-only transform never has Envoy buffer request bodies)."""
        return tuple(
            phase
            for phase, ops in (("request", self._request), ("response", self._response))
            if ops
        )

    def on_request(
        self, ctx: RequestContext
    ) -> RequestModifications | ImmediateResponse | Awaitable[RequestAction | None] | None:
        """Transform the request body: 400 if it is not a JSON object, 413 if it is larger
        than ``maxBodyBytes`` (as sent or once decoded), 415 for a content coding not read.
        On a route that transforms responses, also set ``accept-encoding: identity``.
        Returns an awaitable when the body is decoded in a worker thread."""
        identity = {}
        if self._response and ctx.headers.get("accept-encoding") != "identity":
            identity = {"accept-encoding": "identity"}
        if not self._request or not ctx.body:
            return RequestModifications(set_headers=identity) if identity else None
        body = ctx.body
        if len(body) > self._max_body:
            return _error(
                413, "payload_too_large", f"request body larger than {self._max_body} bytes"
            )
        try:
            codings = _codings(ctx.headers.get("content-encoding"))
            if codings:
                data = _decode(body, codings, min(self._max_body, INLINE_DECODE_BYTES))
            else:
                data = body
        except _TooLargeError as exc:
            if exc.limit >= self._max_body:
                return _error(exc.status, exc.error, f"request {exc}")
            return self._request_in_thread(body, codings, identity)
        except _UnreadableError as exc:
            return _error(exc.status, exc.error, f"request {exc}")
        return self._transform_request(data, bool(codings), identity)

    async def _request_in_thread(
        self, body: bytes, codings: tuple[str, ...], identity: dict[str, str]
    ) -> RequestAction | None:
        try:
            data = await asyncio.to_thread(_decode, body, codings, self._max_body)
        except _UnreadableError as exc:
            return _error(exc.status, exc.error, f"request {exc}")
        return self._transform_request(data, True, identity)

    def _transform_request(
        self, data: bytes, decoded: bool, identity: dict[str, str]
    ) -> RequestModifications | ImmediateResponse | None:
        try:
            body = self._request.apply(data)
        except _UnreadableError as exc:
            return _error(exc.status, exc.error, f"request {exc}")
        if body is None:
            return RequestModifications(set_headers=identity) if identity else None
        # A decoded body goes on without its coding (content-length: the engine).
        remove = ("content-encoding",) if decoded else ()
        return RequestModifications(body=body, set_headers=identity, remove_headers=remove)

    def on_response(
        self, ctx: ResponseContext
    ) -> ResponseModifications | Awaitable[ResponseModifications | None] | None:
        """Transform the response body; raise :class:`~engine.errors.PolicyError` (so
        ``onError`` decides) for a body it cannot read: not a JSON object, larger than
        ``maxBodyBytes`` (as sent or once decoded), a content coding not read. Returns an
        awaitable when the body is decoded in a worker thread."""
        if not self._response or not ctx.body:
            return None
        body = ctx.body
        if len(body) > self._max_body:
            raise PolicyError(
                f"response body of {len(body)} bytes is larger than maxBodyBytes "
                f"({self._max_body}): not transformed"
            )
        try:
            codings = _codings(ctx.headers.get("content-encoding"))
            if not codings:
                return self._transform_response(body, decoded=False)
            data = _decode(body, codings, min(self._max_body, INLINE_DECODE_BYTES))
        except _TooLargeError as exc:
            if exc.limit >= self._max_body:
                raise PolicyError(f"response {exc} (maxBodyBytes): not transformed") from None
            return self._response_in_thread(body, codings)
        except _UnreadableError as exc:
            raise PolicyError(f"response {exc}: not transformed") from None
        return self._transform_response(data, decoded=True)

    async def _response_in_thread(
        self, body: bytes, codings: tuple[str, ...]
    ) -> ResponseModifications | None:
        try:
            data = await asyncio.to_thread(_decode, body, codings, self._max_body)
        except _TooLargeError as exc:
            raise PolicyError(f"response {exc} (maxBodyBytes): not transformed") from None
        except _UnreadableError as exc:
            raise PolicyError(f"response {exc}: not transformed") from None
        return self._transform_response(data, decoded=True)

    def _transform_response(self, data: bytes, *, decoded: bool) -> ResponseModifications | None:
        try:
            body = self._response.apply(data)
        except _UnreadableError as exc:
            raise PolicyError(f"response {exc}: not transformed") from None
        if body is None:
            return None  # nothing the policy reads differently: the original, still coded
        remove = ("content-encoding",) if decoded else ()
        return ResponseModifications(body=body, remove_headers=remove)


def _error(status: int, error: str, message: str) -> ImmediateResponse:
    return ImmediateResponse(
        status=status,
        headers={"content-type": "application/json"},
        body=json.dumps({"error": error, "message": message}).encode(),
    )
