"""Cost of evaluating a CEL condition per request: every field vs just the ones it reads.

``python tools/bench_conditions.py`` prints medians in microseconds. "every field" passes
:func:`engine.conditions.request_data` (all ten request fields, both spellings, and the
metadata, whatever the expression reads); "fields read" is
``Condition.evaluate_request`` (only what the checked AST says the expression reads).
Read ratios, not absolutes, on a shared machine.
"""

from __future__ import annotations

import functools
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.conditions import Condition, compile_condition, request_data
from engine.policy import RequestContext
from engine.testing import make_request_context

EXPRESSIONS = {
    "path prefix": 'request.path.startsWith("/api/")',
    "spec spelling": 'request.Path.startsWith("/api/")',
    "method in list": 'request.method in ["POST", "PUT", "DELETE"]',
    "metadata + header": 'metadata.authenticated == true && request.headers["x-env"] != "prod"',
}


def median_us(fn: Callable[[], object], number: int = 5000, repeat: int = 7) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def _every_field(condition: Condition, ctx: RequestContext) -> bool:
    return condition.evaluate(request_data(ctx))


def main() -> None:
    headers = {f"x-h{i}": "v" * 20 for i in range(8)} | {"x-env": "dev"}
    claims = {"sub": "u1", "aud": ["api"], "exp": 1_900_000_000, "iss": "https://idp"}
    ctx = make_request_context(
        path="/api/users",
        headers=headers,
        metadata={"authenticated": True, "jwt.sub": "u1", "jwt.claims": claims},
    )
    print(f"{'expression':<20} {'every field':>12} {'fields read':>12}")
    for name, expression in EXPRESSIONS.items():
        condition = compile_condition(expression)
        every = median_us(functools.partial(_every_field, condition, ctx))
        read = median_us(functools.partial(condition.evaluate_request, ctx))
        print(f"{name:<20} {every:>10.1f}us {read:>10.1f}us")


if __name__ == "__main__":
    main()
