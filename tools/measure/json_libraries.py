"""Measure JSON libraries for jsonTransform (issue 8 item 12, issue 10 item 5).

One round trip = what the policy does per body: parse bytes, remove two fields,
set two (one a small object), serialise compactly to UTF-8 bytes. Bodies: ~1 KB
and ~100 KB JSON objects (users with nested addresses and tags). Prints the median
microseconds per round trip for stdlib ``json``, ``orjson`` and ``msgspec`` and
checks they produce the same document. Needs orjson and msgspec installed:

    python tools/measure/json_libraries.py [repeats]

It also times a ~4.6 MiB body, and the longest event-loop stall while a worker thread
(asyncio.to_thread) does that round trip: the parsers hold the GIL, so a thread does
not keep the loop free.

No assertions about speed: the figures go into the commit message and docs/ (decisions, benchmarks).
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import orjson

__all__: list[str] = []

Codec = tuple[Callable[[bytes], Any], Callable[[Any], bytes]]

CODECS: dict[str, Codec] = {
    "json": (
        json.loads,
        lambda doc: json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode(),
    ),
    "orjson": (orjson.loads, orjson.dumps),
    "msgspec": (msgspec.json.decode, msgspec.json.encode),
}


def document(users: int) -> bytes:
    return json.dumps(
        {
            "requestId": "r-123",
            "internal": {"trace": "abc", "hops": [1, 2, 3]},
            "users": [
                {
                    "id": i,
                    "name": f"user {i} é",
                    "email": f"user{i}@example.com",
                    "active": i % 2 == 0,
                    "score": i * 1.5,
                    "address": {"city": "Zürich", "zip": "8000", "lines": ["a", "b"]},
                    "tags": ["x", "y", "z"],
                }
                for i in range(users)
            ],
        }
    ).encode()


VALUE = {"source": "gateway", "version": 2}


def transform(doc: dict[str, Any]) -> None:
    doc.pop("internal", None)
    doc["users"][0].pop("email", None)
    doc["meta"] = copy.deepcopy(VALUE)
    doc["requestId"] = "r-456"


def measure(codec: Codec, body: bytes, repeats: int) -> float:
    loads, dumps = codec
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        doc = loads(body)
        transform(doc)
        dumps(doc)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


async def loop_stall(codec: Codec, body: bytes) -> tuple[float, float]:
    """The longest gap (ms) between 1 ms ticks of a coroutine while a worker thread
    (asyncio.to_thread) does one round trip of ``body``, and that round trip's wall
    time (ms): whether a thread keeps the event loop free."""
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    await asyncio.to_thread(measure, codec, body, 1)
    wall = time.perf_counter() - start
    done = True
    await task
    return max(gaps) * 1e3, wall * 1e3


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(f"orjson {orjson.__version__}, msgspec {msgspec.__version__}")
    big = document(23_000)
    for name, codec in CODECS.items():
        micros = measure(codec, big, 5)
        print(f"{len(big) / 2**20:6.1f} MiB {name:8s} {micros / 1e3:9.1f} ms/round trip")
    for name in ("json", "msgspec"):
        stall, wall = asyncio.run(loop_stall(CODECS[name], big))
        print(f"{name} in a thread: {wall:.1f} ms, longest event-loop stall {stall:.1f} ms")
    for users in (5, 500):
        body = document(users)
        outputs = set()
        for name, codec in CODECS.items():
            doc = codec[0](body)
            transform(doc)
            outputs.add(json.dumps(json.loads(codec[1](doc)), sort_keys=True))
            micros = measure(codec, body, repeats)
            print(f"{len(body) / 1024:6.1f} KB  {name:8s} {micros:9.1f} us/round trip")
        assert len(outputs) == 1, "codecs disagree"


if __name__ == "__main__":
    main()
