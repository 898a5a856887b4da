"""GCRA (generic cell rate algorithm): the rate-limit arithmetic both backends share.

Why GCRA rather than a token bucket: it makes the same decisions as a token bucket
of ``burst`` tokens refilled at ``rate`` per second (starting full), but its whole
state is ONE number per client, the theoretical arrival time (TAT). In Redis that is
one short string with an expiry, written with one ``SET ... PX`` by the Lua script
(``gcra.lua``, the same formulas), instead of a two-field hash; and a client whose
TAT has passed is indistinguishable from a client never seen, so the entry can
expire or be dropped without changing any decision.

All times are integer microseconds, so the local backend and the Lua script (whose
numbers are doubles, exact for integers below 2**53) compute identical results.

:class:`LocalBuckets` is the in-process store of the ``local`` backend: bounded to
``max_keys`` entries, and it never hands a client that is still refilling a fresh
bucket (see its docstring).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Final

__all__ = ["MICROS", "Decision", "LocalBuckets", "decide", "interval_us"]

MICROS: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class Decision:
    """One rate-limit decision.

    ``remaining``: requests still allowed right now after this one (0 when denied).
    ``retry_after_us``: when denied, the wait until one request is allowed (else 0).
    ``reset_us``: the wait until the bucket is full again.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after_us: int
    reset_us: int

    @property
    def retry_after_seconds(self) -> int:
        """``Retry-After``: whole seconds, rounded up, at least 1."""
        return max(1, math.ceil(self.retry_after_us / MICROS))

    @property
    def reset_seconds(self) -> int:
        """``RateLimit-Reset``: whole seconds until the bucket is full, rounded up."""
        return math.ceil(self.reset_us / MICROS)


def interval_us(requests_per_second: float) -> int:
    """The emission interval T: microseconds between two requests at the sustained rate
    (at least 1, so absurd rates still make progress)."""
    return max(1, round(MICROS / requests_per_second))


def decide(
    tat: int, now: int, interval: int, burst: int, cost: int = 1, *, charge: bool = False
) -> tuple[Decision, int | None]:
    """The decision for one request of ``cost`` units at ``now`` given the client's stored
    ``tat`` (0 or any past value for an unknown client), and the TAT to store (``None``
    when nothing changes: a denied request, or a cost of 0).

    ``cost=0`` only checks that the bucket is not overspent (the request phase of a
    limit whose cost is known after the response). ``charge=True`` takes ``cost`` units
    whatever the bucket holds (that cost is already spent): the bucket may go negative,
    and the client's next requests wait until it has refilled.

    Mirrors ``gcra.lua`` line by line; the Redis tests check that they agree.
    """
    tat = max(tat, now)
    new_tat = tat + cost * interval
    allow_at = new_tat - burst * interval
    if now < allow_at and not charge:
        return Decision(False, burst, 0, allow_at - now, tat - now), None
    remaining = max(0, (now - allow_at) // interval)
    return Decision(True, burst, remaining, 0, new_tat - now), new_tat if cost else None


class LocalBuckets:
    """GCRA state for the ``local`` backend: identifier -> TAT, in this process.

    Bounded memory: at most ``max_keys`` entries (plus a heap of at most
    ``2 * max_keys + 64`` expiry hints). An entry whose TAT has passed equals a full
    bucket, so dropping it changes nothing; those are the only entries ever dropped.
    When every one of ``max_keys`` clients is still refilling and a new client
    arrives, nothing is evicted (that would give a limited client a fresh bucket):
    the new client is limited in one shared overflow bucket instead, until some
    entry has refilled. Not thread-safe: used from one event loop.
    """

    __slots__ = ("_burst", "_heap", "_interval", "_max_keys", "_overflow", "_tats")

    def __init__(self, interval: int, burst: int, max_keys: int) -> None:
        self._interval = interval
        self._burst = burst
        self._max_keys = max_keys
        self._tats: dict[str | None, int] = {}
        # (tat, key) pushed on every update; stale pairs (tat != current) are skipped.
        self._heap: list[tuple[int, str]] = []
        self._overflow = 0

    def take(self, key: str | None, now: int, cost: int = 1, *, charge: bool = False) -> Decision:
        """Decide for ``key`` at ``now`` (microseconds) and record the request (see
        :func:`decide` for ``cost`` and ``charge``)."""
        tats = self._tats
        tat = tats.get(key)
        if tat is None and len(tats) >= self._max_keys and not self._drop_refilled(now):
            decision, new_tat = decide(
                self._overflow, now, self._interval, self._burst, cost, charge=charge
            )
            if new_tat is not None:
                self._overflow = new_tat
            return decision
        decision, new_tat = decide(tat or 0, now, self._interval, self._burst, cost, charge=charge)
        if new_tat is not None:
            tats[key] = new_tat
            heapq.heappush(self._heap, (new_tat, "" if key is None else "k" + key))
            if len(self._heap) > 2 * self._max_keys + 64:
                self._rebuild_heap()
        return decision

    def _drop_refilled(self, now: int) -> bool:
        """Drop entries whose TAT has passed (they equal full buckets). True if any was."""
        heap, tats = self._heap, self._tats
        dropped = False
        while heap and heap[0][0] <= now:
            tat, tagged = heapq.heappop(heap)
            key = None if tagged == "" else tagged[1:]
            if tats.get(key) == tat:  # not stale: the client made no request since
                del tats[key]
                dropped = True
        return dropped

    def _rebuild_heap(self) -> None:
        self._heap = [(tat, "" if key is None else "k" + key) for key, tat in self._tats.items()]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._tats)
