"""Measure JSON libraries for jsonTransform (issue 8 item 12, issue 10 item 5).

One round trip = what the policy does per body: parse bytes, remove two fields,
set two (one a small object), serialise compactly to UTF-8 bytes. Bodies: ~1 KB
and ~100 KB JSON objects (users with nested addresses and tags). Prints the median
microseconds per round trip for stdlib ``json``, ``orjson`` and ``msgspec`` and
checks they produce the same document. Needs orjson and msgspec installed:

    python tools/measure/json_libraries.py [repeats]

No assertions about speed: the figures go into the commit message and README.
"""

from __future__ import annotations

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


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
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
