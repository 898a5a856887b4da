"""Profile the engine on one benchmark path: ``bench.py --profile headers``.

Starts nginx, the engine (one worker) and Envoy as the benchmark does, loads the path with
wrk (50 connections) and samples the engine with py-spy (``py-spy record --format raw``, 200
samples/s, Python frames only). Writes the collapsed stacks to ``profile-<path>.txt`` and
prints the functions with the most samples, on their own (self) and with what they call
(inclusive). py-spy is not a dependency: install it (``pip install py-spy``) into the
interpreter that runs the benchmark, or put it on ``PATH``.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["find_py_spy", "summarize"]


def find_py_spy() -> Path:
    """py-spy next to this interpreter or on PATH; raises RuntimeError if there is none."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return beside
    found = shutil.which("py-spy")
    if found:
        return Path(found)
    raise RuntimeError(
        "py-spy not found: pip install py-spy (beside this Python) or add it to PATH"
    )


def record(py_spy: Path, pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (collapsed stacks)."""
    return subprocess.Popen(
        [
            *(str(py_spy), "record", "-p", str(pid), "-d", str(seconds), "-r", "200"),
            *("-f", "raw", "-o", str(out), "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize(collapsed: Path, top: int = 25) -> Iterator[str]:
    """Lines: total samples, then the top functions by self and by inclusive samples."""
    total = 0
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    yield f"{total} samples ({collapsed})"
    if not total:
        return
    yield "self (time in the function itself, native code it calls included):"
    yield from (f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top))
    yield "inclusive (with everything it calls):"
    yield from (f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top))
