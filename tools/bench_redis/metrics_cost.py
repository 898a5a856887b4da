"""Engine CPU the metrics add per request: the recording calls one request makes.

Run from the repository root::

    PYTHONPATH=. python tools/bench_redis/metrics_cost.py [--requests 200000]

A request through a chain of P policies makes one ``stream`` call and P ``policy_ran``
calls (plus a skip/short-circuit/failure count when those happen). Printed: microseconds
per request for P = 1 and 3, with metrics off (the no-op path) and on (prometheus-client
multiprocess values: a lock and an mmap write per update). Measured in-process, so it is
the engine's own cost, free of gRPC and scheduling noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from engine import metrics


def per_request(policies: int, requests: int) -> float:
    started = time.process_time()
    for _ in range(requests):
        metrics.stream("api", has_chain=True)
        for _ in range(policies):
            metrics.policy_ran("api", "rateLimit", "v2.0.0", 0.0003)
    return (time.process_time() - started) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    off = {p: per_request(p, args.requests) for p in (1, 3)}
    with tempfile.TemporaryDirectory() as directory:
        metrics.enable(directory)
        metrics.config_published(1, "bench", "0" * 64, ["api"])
        try:
            on = {p: per_request(p, args.requests) for p in (1, 3)}
        finally:
            metrics.disable()
    for p in (1, 3):
        print(
            f"{p} polic{'y' if p == 1 else 'ies'}: metrics off {off[p]:5.2f} us/request, "
            f"on {on[p]:5.2f} us/request (+{on[p] - off[p]:.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
