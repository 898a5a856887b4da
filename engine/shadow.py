"""Shadow mode: what a ``mode: shadow`` chain entry would have done, recorded, never enforced.

The chain executor (engine/chain.py) runs a shadow entry like any other (its condition and
``timeout`` apply) but against a private copy of the context, and then only records what
its action would have done:

=================  =========================================================================
decision           when
=================  =========================================================================
``allow``          the hook returned ``None`` or modifications that change nothing
``would_reject``   it returned an :class:`~engine.policy.ImmediateResponse`
``would_modify``   it returned modifications (headers, path, method, status or body)
``failed``         it raised, timed out, returned the wrong type or an invalid action, its
                   condition failed to evaluate, or its header stripper failed
=================  =========================================================================

Recorded three ways (:func:`record`):

* the counter ``policy_engine_shadow_decisions_total{route,name,version,decision}``
  (:func:`engine.metrics.shadow_decision`; ``decision`` is one of :data:`DECISIONS`);
* the request metadata key :data:`SHADOW_KEY` (``engine.shadow``), e.g.
  ``jwtValidation v1.0.0: would 401``; several shadow entries (or both phases) join with
  ``"; "``. It is among the keys sent to Envoy as dynamic metadata by default, so an access
  log prints it with ``%DYNAMIC_METADATA(policy_engine:engine.shadow)%``;
* a log line (logger ``engine.shadow``, INFO) for each ``would_reject`` and ``failed``
  decision, at most one per (route, policy, decision) every :data:`LOG_INTERVAL` seconds;
  the next line says how many were left out.

What a shadow entry never does: answer the request, change headers, path, method, status or
body, strip headers (``strip_request_headers``), fail the request (``onError`` and
``errorStatus`` are ignored), or write metadata other policies see (its writes go to a copy
that is dropped after the hook). Only :data:`SHADOW_KEY` is written, by the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from engine import metrics
from engine.policy import (
    ImmediateResponse,
    Metadata,
    RequestModifications,
    ResponseModifications,
)

__all__ = [
    "DECISIONS",
    "LOG_INTERVAL",
    "SHADOW_KEY",
    "ShadowDecision",
    "failed",
    "record",
    "request_decision",
    "response_decision",
]

logger: Final = logging.getLogger("engine.shadow")

SHADOW_KEY: Final = "engine.shadow"
"""Metadata key holding what the request's shadow entries would have done."""

DECISIONS: Final = ("allow", "would_reject", "would_modify", "failed")
"""The values of the metric's ``decision`` label."""

LOG_INTERVAL: Final = 10.0
"""Seconds between two log lines for one (route, policy, decision)."""

_MAX_NAMES: Final = 4  # header names shown in a would_modify note; the rest are counted
_MAX_NOTE: Final = 1000  # characters kept in the metadata value (many shadow entries)

ShadowDecision = tuple[str, str, str]
"""``(decision, note, detail)``: a value of :data:`DECISIONS`, its short description (for
the metadata) and, for failures, the reason (for the log line only)."""


def _names(verb: str, names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    more = len(names) - _MAX_NAMES
    return f"{verb} {shown}" + (f" (+{more})" if more > 0 else "")


def _changes(action: RequestModifications | ResponseModifications) -> list[str]:
    parts = []
    set_names = sorted({*action.set_headers, *action.append_headers})
    if set_names:
        parts.append(_names("set", [n.lower() for n in set_names]))
    if action.remove_headers:
        parts.append(_names("remove", sorted({n.lower() for n in action.remove_headers})))
    if action.body is not None:
        parts.append("body")
    return parts


def request_decision(action: RequestModifications | ImmediateResponse | None) -> ShadowDecision:
    """The decision of a request action that passed the executor's checks."""
    if action is None:
        return "allow", "allow", ""
    if isinstance(action, ImmediateResponse):
        return "would_reject", f"would {action.status}", ""
    parts = _changes(action)
    if action.path is not None:
        parts.append("path")
    if action.method is not None:
        parts.append("method")
    if not parts:
        return "allow", "allow", ""
    return "would_modify", f"would {'; '.join(parts)}", ""


def response_decision(action: ResponseModifications | None) -> ShadowDecision:
    """The decision of a response action that passed the executor's checks."""
    if action is None:
        return "allow", "allow", ""
    parts = _changes(action)
    if action.status is not None:
        parts.insert(0, f"status {action.status}")
    if not parts:
        return "allow", "allow", ""
    return "would_modify", f"would {'; '.join(parts)}", ""


def failed(kind: str, detail: str = "") -> ShadowDecision:
    """The decision of a shadow entry that failed (``kind`` as in ``policy_failures_total``;
    ``detail``: the reason, for the log line)."""
    return "failed", f"failed ({kind})", detail


class _LogLimiter:
    """At most one line per key every :data:`LOG_INTERVAL` seconds; keys are (route,
    policy, decision), bounded by the configuration (cleared if it ever grows past
    ``_MAX_KEYS``, e.g. after many reloads with new route keys)."""

    _MAX_KEYS: Final = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._next: dict[tuple[str, str, str], tuple[float, int]] = {}

    def allow(self, key: tuple[str, str, str]) -> int | None:
        """None: do not log now. Else the number of lines left out since the last one."""
        now = self._clock()
        due, skipped = self._next.get(key, (0.0, 0))
        if now < due:
            self._next[key] = (due, skipped + 1)
            return None
        if len(self._next) >= self._MAX_KEYS:
            self._next.clear()
        self._next[key] = (now + LOG_INTERVAL, 0)
        return skipped


_limiter: Final = _LogLimiter()


def record(  # noqa: PLR0917 - one call site per phase in the executor
    route: str,
    name: str,
    version: str,
    request_id: str,
    metadata: Metadata,
    decision: ShadowDecision,
) -> None:
    """Count ``decision`` of shadow entry ``name version`` on ``route``, add it to the
    request's :data:`SHADOW_KEY` metadata, and log it if it is a rejection or a failure
    (rate-limited)."""
    label, note, detail = decision
    metrics.shadow_decision(route, name, version, label)
    text = f"{name} {version}: {note}"
    previous = metadata.get(SHADOW_KEY)
    if isinstance(previous, str) and previous:
        text = f"{previous}; {text}"
    metadata[SHADOW_KEY] = text[:_MAX_NOTE]
    if label in ("would_reject", "failed"):
        skipped = _limiter.allow((route, f"{name} {version}", label))
        if skipped is not None:
            logger.info(
                "request %s: route %r: shadow policy %s %s: %s (not enforced)%s",
                request_id,
                route,
                name,
                version,
                detail or note,
                f"; {skipped} more like this not logged" if skipped else "",
            )
