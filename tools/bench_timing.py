"""Cost of per-policy timing (``debug: {timing: true}``, engine/timing.py) in the executor.

``/work/venv/bin/python tools/bench_timing.py [--before REV]`` (from a git checkout) runs
one request (request then response phase) through a 3-entry chain, in-process, three ways
side by side in interleaved rounds:

* ``before``: engine/chain.py as it was at ``REV`` (default: the commit before timing
  came), loaded from git under another module name; no timing in it at all;
* ``off``: today's engine/chain.py, the route without ``debug.timing``;
* ``on``: today's, the route with ``debug: {timing: true}``.

It prints the median microseconds per request of each and the ratios ``off / before``
(what the feature costs routes that do not use it: ~1.00 expected) and ``on / off``.
Read ratios, not absolutes, on a shared machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.policy import (
    Headers,
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BEFORE = "3db55a4"


class SetOne:
    """A plain hook setting one request header (the common cheap policy)."""

    def __init__(self, name: str) -> None:
        self.action = RequestModifications(set_headers={name: "1"})

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return self.action


class ResponseOne:
    action = ResponseModifications(set_headers={"x-served-by": "bench"})

    def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        return self.action


def load_chain(source: str, name: str) -> ModuleType:
    """engine/chain.py's ``source`` as module ``name``. Both variants are loaded this way,
    so whatever loading does to speed, it does to both."""
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def git_source(rev: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:engine/chain.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def make_chain(module: ModuleType, **options: Any) -> Any:
    policy = module.ChainPolicy
    entries = (
        policy(name="a", version="v1.0.0", instance=SetOne("x-a"), has_request=True),
        policy(name="b", version="v1.0.0", instance=SetOne("x-b"), has_request=True),
        policy(name="c", version="v1.0.0", instance=ResponseOne(), has_response=True),
    )
    return module.Chain(route="r", policies=entries, **options)


async def one_request(module: ModuleType, chain: Any) -> None:
    ctx = RequestContext(
        headers=Headers({"host": "example.test", "accept": "*/*"}),
        path="/api/x",
        method="GET",
        request_id="1",
        route="r",
    )
    await module.run_request(chain, ctx)
    response = ResponseContext(
        request=ctx,
        status=200,
        headers=Headers({"content-type": "text/plain"}),
        metadata=ctx.metadata,
    )
    await module.run_response(chain, response)


async def per_request_us(module: ModuleType, chain: Any, number: int) -> float:
    started = time.perf_counter()
    for _ in range(number):
        await one_request(module, chain)
    return (time.perf_counter() - started) / number * 1e6


async def measure(
    before: ModuleType, now: ModuleType, rounds: int, number: int
) -> dict[str, float]:
    variants = {
        "before": (before, make_chain(before)),
        "off": (now, make_chain(now)),
        "on": (now, make_chain(now, timing=True)),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for module, chain in variants.values():  # warm up
        await per_request_us(module, chain, number // 10 or 1)
    names = list(variants)
    for round_ in range(rounds):
        # Each round starts with another variant: a drift in machine load spreads evenly.
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            module, chain = variants[name]
            samples[name].append(await per_request_us(module, chain, number))
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of 'before'")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--number", type=int, default=1000, help="requests per round")
    args = parser.parse_args(argv)
    before = load_chain(git_source(args.before), "engine._chain_before")
    now = load_chain((REPO / "engine" / "chain.py").read_text(), "engine._chain_now")
    medians = asyncio.run(measure(before, now, args.rounds, args.number))
    print("3-entry chain, request + response phase, in-process (median us per request)")
    for name, value in medians.items():
        print(f"  {name:<7} {value:8.2f}")
    print(f"  off / before  {medians['off'] / medians['before']:.3f}")
    print(f"  on / off      {medians['on'] / medians['off']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
