"""Summary statistics the benchmarks print: //tools/bench and //tools/xdsbench share them."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["percentile"]


def percentile(values: Iterable[float], fraction: float) -> float:
    """The value at ``fraction`` (0 to 1) of ``values`` in ascending order: the element at
    index ``round(fraction * (n - 1))``, clamped to the list, without interpolation
    (Python's ``round``: halves to even). 0 is the minimum, 1 the maximum, 0.5 the median
    of an odd count. ``values`` need not be sorted; none raises ``IndexError``."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
