"""Waiting for the engines: what each engine stream answered to one table version.

The admin API's ``?wait=SECONDS`` (:mod:`controlplane.admin`) calls
:func:`wait_for_engines` right after a change is accepted, with the streams open at that
moment. Each stream's result for the version:

===============  ================================================================
``ACK``          it ACKed the version's RouteChain response: it runs that version
                 (an engine applies settings and routes of one version as a pair,
                 :mod:`engine.xds.client`, so this is its "I run version N")
``NACK``         it NACKed the version (either half); ``error`` is its text, scrubbed
                 of secrets and bounded (:class:`~controlplane.ads.EngineStatus`)
``superseded``   it answered a newer version instead (another change came before its
                 verdict on this one; versions coalesce); ``version`` is that newer one
``disconnected`` its stream ended before it answered
``timeout``      it had not answered when the time was up
===============  ================================================================

No polling: the waiter sleeps on :meth:`AdsServer.changed <controlplane.ads.AdsServer.changed>`,
set at each verdict and stream end, and re-reads the statuses then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from controlplane.ads import AdsServer, EngineStatus
from controlplane.table import TableVersion

__all__ = ["EngineResult", "result_of", "wait_for_engines"]


@dataclass(frozen=True, slots=True)
class EngineResult:
    """One engine stream's answer to one version (see the module docstring)."""

    node: str
    stream: int
    peer: str
    result: str
    version: str
    error: str = ""

    @property
    def acked(self) -> bool:
        return self.result == "ACK"

    def as_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "node": self.node,
            "stream": self.stream,
            "peer": self.peer,
            "result": self.result,
            "version": self.version,
        }
        if self.result == "NACK":
            shown["nackError"] = self.error
        return shown


def result_of(engine: EngineStatus, version: TableVersion) -> EngineResult | None:
    """``engine``'s answer to ``version`` so far; ``None`` while it is still due."""

    def result(kind: str, answered: str = version.version, error: str = "") -> EngineResult:
        return EngineResult(engine.node_id, engine.stream, engine.peer, kind, answered, error)

    if engine.acked_version == version.version:
        return result("ACK")
    if engine.nacked_version == version.version:
        return result("NACK", error=engine.nack_error)
    if engine.acked_generation > version.generation:
        return result("superseded", engine.acked_version)
    if engine.nacked_generation > version.generation:
        return result("superseded", engine.nacked_version)
    if not engine.connected:
        return result("disconnected")
    return None


async def wait_for_engines(
    ads: AdsServer,
    version: TableVersion,
    engines: Sequence[EngineStatus],
    seconds: float,
) -> list[EngineResult]:
    """Until every one of ``engines`` has answered ``version`` (or the stream ended), or
    for ``seconds``; one result per engine, in the order given."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        changed = ads.changed()  # before reading: a verdict after this read sets it
        results = [result_of(engine, version) for engine in engines]
        remaining = deadline - loop.time()
        if all(r is not None for r in results) or remaining <= 0:
            break
        # On time-out, read once more: a verdict may have come with the deadline.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), remaining)
    return [
        r
        if r is not None
        else EngineResult(e.node_id, e.stream, e.peer, "timeout", version.version)
        for e, r in zip(engines, results, strict=True)
    ]
