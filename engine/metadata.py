"""Per-request metadata that CEL conditions can always read.

Policies share one mapping per request (``ctx.metadata``). CEL conditions read it as
a whole: the binding converts *every* value before evaluating, so one value CEL cannot
represent (an int >= 2^64 or < -2^63, a string with a lone surrogate, a tuple, a set,
an arbitrary object, a value nested thousands of levels deep, which crashed the
process) used to make every metadata condition of the request fail, and a failing
condition skips its policy. JWT claims are attacker-chosen JSON, so that was a way to
switch policies off.

:class:`RequestMetadata` checks each value where it is written
(``__setitem__``, and so ``update`` and ``setdefault``) and stores what CEL can hold:

* ``None``, ``bool``, ``float``, ``bytes``, ``str`` and ints in [-2^63, 2^64) as is;
* a lone surrogate in a string becomes U+FFFD;
* an int outside that range becomes a float (order kept), or is dropped if no float
  holds it;
* tuples become lists, sets become (sorted when possible) lists, ``bytearray`` and
  ``memoryview`` become ``bytes``;
* mappings become dicts; an entry whose key is not a string, an int or a bool is
  dropped;
* anything else, and anything nested deeper than :data:`MAX_DEPTH`, is dropped.

Each conversion or drop logs one warning naming the policy that wrote it (the chain
executor sets :data:`CURRENT_POLICY` while a hook runs) and the key. Values are checked
when written: mutating a stored list or dict afterwards is not seen, so write values
whole. Clean values are stored without copying.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, Final

__all__ = ["CURRENT_POLICY", "MAX_DEPTH", "RequestMetadata", "cel_value"]

logger: Final = logging.getLogger("engine.metadata")

MAX_DEPTH: Final = 32
"""Deepest nesting kept in a metadata value."""

CURRENT_POLICY: Final[contextvars.ContextVar[str]] = contextvars.ContextVar(
    "engine_current_policy", default="(no policy)"
)
"""Label (``name version``) of the policy whose hook is running; set by the executor."""

_INT_MIN: Final = -(2**63)
_INT_END: Final = 2**64  # CEL has int64 and uint64
_DROP: Final = object()
# isinstance() type tuples, not ``X | Y``: a union in an expression builds a new
# types.UnionType on every call, and these checks run per metadata value per request.
_PLAIN: Final = (bool, float, bytes)
_FAST_SCALARS: Final = (bool, float)
_SEQUENCES: Final = (list, tuple, set, frozenset)
_SETS: Final = (set, frozenset)
_BUFFERS: Final = (bytearray, memoryview)


class _Report:
    """Problems found in one value; the first few are logged."""

    __slots__ = ("problems",)

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, where: str, problem: str) -> None:
        if len(self.problems) < 5:
            self.problems.append(f"{where}: {problem}" if where else problem)


def _string(value: str, where: str, report: _Report) -> str:
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        report.add(where, "lone surrogate replaced by U+FFFD")
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return value


def _convert(value: Any, where: str, depth: int, report: _Report) -> Any:
    """``value`` as CEL can hold it, or ``_DROP``; returns ``value`` itself when clean."""
    if value is None or isinstance(value, _PLAIN):
        return value
    if isinstance(value, str):
        return _string(value, where, report)
    if isinstance(value, int):
        if _INT_MIN <= value < _INT_END:
            return value
        try:
            converted = float(value)
        except OverflowError:
            report.add(where, "integer too large for CEL (dropped)")
            return _DROP
        report.add(where, "integer outside int64/uint64 converted to double")
        return converted
    if depth >= MAX_DEPTH:
        report.add(where, f"nested more than {MAX_DEPTH} levels deep (dropped)")
        return _DROP
    if isinstance(value, _SEQUENCES):
        items: Any = value
        if isinstance(value, _SETS):
            try:
                items = sorted(value)
            except TypeError:
                items = list(value)
        changed = not isinstance(value, list)
        out = []
        for index, item in enumerate(items):
            converted = _convert(item, f"{where}[{index}]", depth + 1, report)
            if converted is not item:
                changed = True
            if converted is not _DROP:
                out.append(converted)
        if not isinstance(value, list):
            report.add(where, f"{type(value).__name__} converted to a list")
        return out if changed else value
    if isinstance(value, Mapping):
        changed = type(value) is not dict
        entries: dict[Any, Any] = {}
        for key, item in value.items():
            label = f"{where}[{key!r:.40}]"
            if isinstance(key, str):
                clean_key: Any = _string(key, label, report)
            elif isinstance(key, bool) or (isinstance(key, int) and _INT_MIN <= key < _INT_END):
                clean_key = key
            else:
                report.add(label, f"{type(key).__name__} key (entry dropped)")
                changed = True
                continue
            converted = _convert(item, label, depth + 1, report)
            if converted is not item or clean_key is not key:
                changed = True
            if converted is not _DROP:
                entries[clean_key] = converted
        return entries if changed else value
    if isinstance(value, _BUFFERS):
        return bytes(value)
    report.add(where, f"{type(value).__name__} is not a CEL value (dropped)")
    return _DROP


def cel_value(value: Any, key: str = "") -> tuple[Any, list[str]]:
    """``(converted, problems)``: ``value`` as CEL can hold it (``value`` itself when
    it already can) and what had to change. ``converted`` is :data:`None` with a
    problem ending in ``(dropped)`` when nothing of it can be kept."""
    report = _Report()
    converted = _convert(value, key, 0, report)
    return (None if converted is _DROP else converted), report.problems


class RequestMetadata(MutableMapping[str, Any]):
    """The per-request metadata mapping: a dict whose values CEL can always read.

    Wraps ``initial`` (a dict is used in place, so a caller holding it sees the
    writes; its values are checked now). See the module docstring for the rules.
    """

    __slots__ = ("_data",)

    def __init__(self, initial: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = initial if type(initial) is dict else {}
        if self._data:
            for key, value in list(self._data.items()):
                written: object = key  # callers may hand over any dict
                if not isinstance(written, str):
                    del self._data[key]
                self[key] = value
        elif initial:
            self.update(initial)

    def __setitem__(self, key: str, value: Any) -> None:
        written: object = key  # policies are untyped code: check what arrives
        if not isinstance(written, str):
            self._log(repr(written), ["metadata keys must be strings (dropped)"])
            return
        clean_key = _string(written, "", _Report())
        converted = value
        # Fast path for the common scalar values: no walk, no report.
        if not (
            value is None
            or isinstance(value, _FAST_SCALARS)
            or (isinstance(value, str) and value.isascii())
        ):
            converted, problems = cel_value(value)
            if problems:
                self._log(clean_key, problems)
                if converted is None:  # dropped whole: the key holds nothing, not a stale value
                    self._data.pop(clean_key, None)
                    return
        self._data[clean_key] = converted

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def cel_view(self) -> dict[str, Any]:
        """The stored dict itself, for the CEL binding (which converts only real
        dicts). Read-only by convention: write through the mapping."""
        return self._data

    def __repr__(self) -> str:
        return f"RequestMetadata({self._data!r})"

    @staticmethod
    def _log(key: str, problems: list[str]) -> None:
        logger.warning(
            "policy %s wrote metadata %r that CEL cannot represent: %s",
            CURRENT_POLICY.get(),
            key,
            "; ".join(problems),
        )
