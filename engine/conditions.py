"""CEL conditions that decide, per request, whether a chain entry runs.

Built on cel-expr-python (cel-cpp). One CEL environment is created at import;
expressions are compiled (parsed *and* type-checked) at config time, so a syntax
error or an undeclared variable rejects the configuration instead of failing
requests. Three variables are declared, each ``map(string, dyn)``:

* ``request``: ``path``, ``method``, ``headers`` (map of lower-case name ->
  value), ``id``, ``route``. In the response phase: the request as sent upstream.
* ``response``: ``status``, ``headers`` in the response phase; an *empty* map in
  the request phase (so ``response.status`` there is a runtime error, which
  skips the policy; guard with ``has(response.status)``).
* ``metadata``: what earlier policies of this request wrote.

cel-expr-python does not raise on evaluation errors: it returns a value of type
``ERROR``. :meth:`Condition.evaluate` turns that, and any non-bool result, into
:class:`~engine.errors.ConditionEvaluationError`.

Cost (see notes/library-measurements.md): evaluating from a plain dict is about
6 us per call, of which the dict -> CEL conversion is most; the dicts are built
only for entries that have a condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from cel_expr_python import cel

from engine.errors import ConditionError, ConditionEvaluationError
from engine.policy import RequestContext, ResponseContext

__all__ = [
    "VARIABLES",
    "Condition",
    "ConditionEvaluationError",
    "compile_condition",
    "request_data",
    "response_data",
]

VARIABLES: Final = ("request", "response", "metadata")

_ENV: Final = cel.NewEnv(
    variables={name: cel.Type.Map(cel.Type.STRING, cel.Type.DYN) for name in VARIABLES}
)
_EMPTY: Final[Mapping[str, Any]] = {}


class Condition:
    """A compiled CEL expression that yields a bool. Immutable; safe to share."""

    __slots__ = ("_program", "expression")

    def __init__(self, expression: str, program: Any) -> None:
        self.expression = expression
        self._program = program

    def evaluate(self, data: Mapping[str, Any]) -> bool:
        """Evaluate with ``data`` holding ``request``, ``response`` and ``metadata``.

        Raises :class:`ConditionEvaluationError` for a runtime error (missing key,
        wrong type, a metadata value CEL cannot represent) or a non-bool result.
        """
        try:
            value = self._program.eval(data=data)
        except Exception as exc:  # the binding may raise on values it cannot convert
            raise ConditionEvaluationError(f"condition {self.expression!r} failed: {exc}") from exc
        kind = value.type()
        if kind == cel.Type.ERROR:
            raise ConditionEvaluationError(f"condition {self.expression!r} failed: {value.value()}")
        if kind != cel.Type.BOOL:
            raise ConditionEvaluationError(
                f"condition {self.expression!r} returned {kind.name().lower()}, not bool"
            )
        return bool(value.value())

    def __repr__(self) -> str:
        return f"Condition({self.expression!r})"


def compile_condition(expression: str) -> Condition:
    """Parse and type-check ``expression``; raise :class:`ConditionError` with the
    CEL error text for a syntax error, an undeclared variable, or an expression
    whose type is known not to be bool (``dyn`` results are checked per call)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ConditionError("must be a non-empty CEL expression")
    try:
        program = _ENV.compile(expression)
    except Exception as exc:  # cel-expr-python raises RuntimeError("INVALID_ARGUMENT: ...")
        raise ConditionError(_clean(str(exc))) from exc
    result = program.return_type()
    if result not in (cel.Type.BOOL, cel.Type.DYN):
        raise ConditionError(f"must evaluate to bool, but its type is {result.name().lower()}")
    return Condition(expression, program)


def _clean(message: str) -> str:
    """``INVALID_ARGUMENT: ERROR: <input>:1:14: Syntax error: ...\n | expr\n | ^ [...]``
    -> ``1:14: Syntax error: ...``: one line per CEL error (line:column kept), without
    the status code and the caret drawing, which would break one-line config errors."""
    message = message.strip().removeprefix("INVALID_ARGUMENT: ")
    found = [
        line.strip().removeprefix("ERROR: ").removeprefix("<input>:")
        for line in message.splitlines()
        if line.strip().startswith("ERROR: ")
    ]
    return "; ".join(found) if found else message.removesuffix(" [INVALID_ARGUMENT]")


def _plain(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    # The binding converts only real dicts (a MappingProxy is a "Non-CEL value").
    return mapping if type(mapping) is dict else dict(mapping)


def _request_map(ctx: RequestContext) -> dict[str, Any]:
    return {
        "path": ctx.path,
        "method": ctx.method,
        "headers": _plain(ctx.headers),
        "id": ctx.request_id,
        "route": ctx.route,
    }


def request_data(ctx: RequestContext) -> dict[str, Any]:
    """Condition variables for the request phase (``response`` is empty)."""
    return {"request": _request_map(ctx), "response": _EMPTY, "metadata": _plain(ctx.metadata)}


def response_data(ctx: ResponseContext) -> dict[str, Any]:
    """Condition variables for the response phase."""
    return {
        "request": _request_map(ctx.request),
        "response": {"status": ctx.status, "headers": _plain(ctx.headers)},
        "metadata": _plain(ctx.metadata),
    }
