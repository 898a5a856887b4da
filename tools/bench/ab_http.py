"""Two checkouts' engines side by side over Envoy's HTTP ext_proc transport (paired A/B).

An optimisation of the HTTP path changes the engine's CPU per request by a few microseconds,
less than this machine kind's drift between the minutes of one ``tools/bench/http_transport``
run. This measures it in pairs: two stacks built as that benchmark builds its own (Envoy 1.36
with 1 worker, nginx, the engine with 1 worker on ``tools/bench/paths.py``'s configuration),
one running the engine of this checkout ("new") and one the engine of ``--old`` (another
checkout of the repository, e.g. ``git worktree add /tmp/old <commit>``, with its
``generated/python``), plus the trivial HTTP server (``tools/bench/http_floor.py``) behind the
new stack's Envoy as the floor. Each round runs every (stack, path) once in a shuffled order,
wrk with 50 connections; CPU per request is the server process's utime + stime over the run
divided by the requests. Printed: medians per path and the new/old ratio of each round
(paired), whose median is the figure to quote. Asserts nothing.

Run from the repository root, outside Bazel (the other checkout is not in its runfiles)::

    python -m tools.protoc.gen_protos        # generated/python, once per checkout
    PYTHONPATH=$PWD:$PWD/generated/python python -m tools.bench.ab_http --old /tmp/old

``--rounds`` (default 8) and ``--seconds`` per run (default 3): about 3 minutes.
``--paths`` picks the engine paths (default the two 5 x setHeader chains; ``jwt-http``:
jwtValidation + rateLimit).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Final

from tools.bench.http_transport import PATHS, QUICK, Bench, Path_
from tools.bench.loadtools import find_tools
from tools.bench.procs import cpu_seconds, free_port

__all__ = ["main"]

ENGINE_PATHS: Final = ("headers1-http", "headers-http")
"""The default engine paths (``--paths``: any of http_transport's ``*-http`` engine paths)."""
FLOOR_PATHS: Final = ("floor1-http", "floor2-http")

Runs = dict[tuple[str, str], list[tuple[float, float]]]


def _measure(
    bench: Bench,
    stacks: dict[str, tuple[int, int]],
    floor_pid: int,
    token: str,
    *,
    engine_paths: tuple[str, ...],
    rounds: int,
    seconds: float,
) -> Runs:
    paths: dict[str, Path_] = {p.name: p for p in PATHS}
    runs: Runs = {}
    for round_ in range(rounds):
        order = [(s, p) for s in stacks for p in engine_paths] + [("new", p) for p in FLOOR_PATHS]
        random.Random(round_).shuffle(order)
        for stack, name in order:
            listener, engine_pid = stacks[stack]
            pid = floor_pid if name in FLOOR_PATHS else engine_pid
            bench.wrk(listener, paths[name], token, connections=4, seconds=0.5)  # warm up
            before = sum(cpu_seconds(pid).values())
            sat = bench.wrk(listener, paths[name], token, connections=50, seconds=seconds)
            after = sum(cpu_seconds(pid).values())
            if sat.errors or sat.non_2xx:
                raise SystemExit(
                    f"ab_http: {stack} {name}: {sat.errors} errors, {sat.non_2xx} non-2xx"
                )
            runs.setdefault((stack, name), []).append(
                (sat.rps, (after - before) / max(sat.requests, 1) * 1e6)
            )
        print(f"ab_http: round {round_ + 1} of {rounds}", flush=True)
    return runs


def format_lines(runs: Runs, engine_paths: tuple[str, ...] = ENGINE_PATHS) -> list[str]:
    lines = [
        "| path | engine | rps (median) | CPU us/request (median) | CPU per round |",
        "|---|---|---|---|---|",
    ]
    for (stack, name), rs in runs.items():
        rps = statistics.median(r[0] for r in rs)
        cpu = statistics.median(r[1] for r in rs)
        rounds = " ".join(f"{r[1]:.0f}" for r in rs)
        label = "floor" if name in FLOOR_PATHS else stack
        lines.append(f"| {name} | {label} | {rps:,.0f} | {cpu:.1f} | {rounds} |")
    for name in engine_paths:
        pairs = list(zip(runs[("old", name)], runs[("new", name)], strict=True))
        cpu_ratios = [new[1] / old[1] for old, new in pairs]
        rps_ratios = [new[0] / old[0] for old, new in pairs]
        lines.append(
            f"{name}: new/old CPU per request, paired median {statistics.median(cpu_ratios):.2f} "
            f"(rounds {' '.join(f'{x:.2f}' for x in cpu_ratios)}); "
            f"rps {statistics.median(rps_ratios):.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ab_http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the other checkout's root")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    engine_http = [p.name for p in PATHS if p.server == "engine" and p.name.endswith("-http")]
    parser.add_argument(
        "--paths",
        default=",".join(ENGINE_PATHS),
        help=f"comma-separated engine paths, of: {', '.join(engine_http)}",
    )
    args = parser.parse_args(argv)
    engine_paths = tuple(p for p in args.paths.split(",") if p)
    unknown = sorted(set(engine_paths) - set(engine_http))
    if unknown or not engine_paths:
        parser.error(f"--paths: unknown {', '.join(unknown) or '(none given)'}")
    old = args.old.resolve()
    if not (old / "engine").is_dir() or not (old / "generated" / "python").is_dir():
        parser.error(f"--old {old}: not a checkout with engine/ and generated/python/")
    with tempfile.TemporaryDirectory(prefix="ab-http-") as directory:
        work = Path(directory)
        bench = Bench(find_tools(), work, QUICK)
        try:
            with bench.backends() as backends:
                stacks: dict[str, tuple[int, int]] = {}
                for stack, tree in (("old", old), ("new", None)):
                    http_port = free_port()
                    grpc_port, pid = bench.procs.engine(
                        f"engine-{stack}",
                        backends.config,
                        workers=1,
                        http_port=http_port,
                        tree=tree,
                    )
                    listener = bench.start_envoy(
                        f"envoy-{stack}", (grpc_port, http_port), backends.floors, 2.0
                    )
                    stacks[stack] = (listener, pid)
                runs = _measure(
                    bench,
                    stacks,
                    backends.floor_pids["floor-http"],
                    backends.token,
                    engine_paths=engine_paths,
                    rounds=args.rounds,
                    seconds=args.seconds,
                )
        finally:
            bench.procs.close()
    for line in format_lines(runs, engine_paths):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
