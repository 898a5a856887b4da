"""Per-policy time of one request, on demand: a route's ``debug: {timing: true}``.

The histograms (``policy_engine_policy_duration_seconds``) say how a policy behaves over
many requests; this says where the time of ONE request went. On a route configured::

    routes:
      checkout:
        debug: {timing: true}
        policies: [...]

the chain executor (engine/chain.py) measures each entry it reaches with
:func:`time.perf_counter_ns` (condition, hook or static action, and applying the action;
an entry whose condition is false is measured too, its condition is its cost) and records:

* the request metadata key :data:`TIMING_KEY` (``engine.timing``), among the keys sent to
  Envoy as dynamic metadata by default: an access log prints it with
  ``%DYNAMIC_METADATA(policy_engine:engine.timing)%``;
* the response header :data:`TIMING_HEADER` (``x-policy-engine-timing``), in the
  ``Server-Timing`` syntax (RFC 8941-like list, ``dur`` in milliseconds)::

      x-policy-engine-timing: jwtValidation;dur=0.412, setHeader;dur=0.018,
                              setHeader;desc=response;dur=0.009

  ``desc`` says ``response`` for a response-phase run, ``body`` for a streamed body's
  chunk hook (its time summed over the whole body: ``desc=body`` for the request body,
  ``desc="response body"``), and ``shadow`` for a ``mode: shadow`` entry. It is on
  immediate responses too (a 401 from jwtValidation), and on
  every response of the route, so Envoy is asked for the response headers even when
  the chain has no response policy (one more ext_proc message per request: a debugging
  setting, not one for every route in production). With a STREAMED response body the
  headers are already on their way when the policies run: the header is left out, the
  metadata is still written, and a streamed body's entries are added when the body ends
  (the dynamic metadata Envoy gets at the end of the stream; a request body's entries are
  in the response header when the request body ended before the response headers).

A route without policies times nothing and sends no header; a route without the
setting pays nothing (the executor checks one flag per phase, see tools/bench_timing.py).
The header is seen by whoever gets the response: enable it on routes where the client
may know which policies run and how long they take.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from engine.policy import ImmediateResponse

if TYPE_CHECKING:
    from engine.chain import ResponseOutcome

__all__ = [
    "TIMING_HEADER",
    "TIMING_KEY",
    "format_entry",
    "record",
    "value",
    "with_header",
    "without_header",
]

TIMING_HEADER: Final = "x-policy-engine-timing"
TIMING_KEY: Final = "engine.timing"


def format_entry(
    name: str, nanoseconds: int, *, response: bool, shadow: bool, body: bool = False
) -> str:
    """One ``Server-Timing`` entry: ``name[;desc=...];dur=<milliseconds>``."""
    words = (("response", response), ("body", body), ("shadow", shadow))
    desc = " ".join(word for word, on in words if on)
    if " " in desc:
        desc = f'"{desc}"'
    described = f";desc={desc}" if desc else ""
    return f"{name}{described};dur={nanoseconds / 1_000_000:.3f}"


def record(
    metadata: MutableMapping[str, Any],
    name: str,
    nanoseconds: int,
    *,
    response: bool = False,
    shadow: bool = False,
    body: bool = False,
) -> None:
    """Append one entry to the request's :data:`TIMING_KEY` (written whole: see
    :class:`~engine.metadata.RequestMetadata`). ``body``: the time of a streamed body's
    chunk hook, summed over the body (engine/streaming.py)."""
    entry = format_entry(name, nanoseconds, response=response, shadow=shadow, body=body)
    before = metadata.get(TIMING_KEY)
    metadata[TIMING_KEY] = f"{before}, {entry}" if isinstance(before, str) and before else entry


def value(metadata: Mapping[str, Any]) -> str | None:
    """The header value so far, or None when nothing was timed (no empty header)."""
    text = metadata.get(TIMING_KEY)
    return text if isinstance(text, str) and text else None


def with_header(response: ImmediateResponse, metadata: Mapping[str, Any]) -> ImmediateResponse:
    """``response`` (shared, never mutated) with the timing header added, if any."""
    text = value(metadata)
    if text is None:
        return response
    return replace(response, headers={**response.headers, TIMING_HEADER: text})


def without_header(outcome: ResponseOutcome) -> ResponseOutcome:
    """``outcome`` without the timing header: for a reply that can no longer change the
    response headers (a STREAMED response body), where the header is left out rather than
    turned into a failure."""
    if TIMING_HEADER not in outcome.set_headers:
        return outcome
    kept = {k: v for k, v in outcome.set_headers.items() if k != TIMING_HEADER}
    return replace(outcome, set_headers=MappingProxyType(kept))
