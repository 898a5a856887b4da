"""CEL conditions that decide, per request, whether a chain entry runs.

Built on cel-expr-python (cel-cpp). Expressions are compiled (parsed *and*
type-checked) when configuration loads, so a syntax error, an unknown variable,
an unknown field, a type error or a bad constant regular expression rejects the
configuration instead of failing requests. A condition that still fails at request
time (a missing map key) is its policy's failure: :mod:`engine.chain` applies the
entry's ``onError`` (fail closed by default), never a silent skip.

Variables, with real types (a typo such as ``request.pathh`` is a config error):

* ``request``: ``path``, ``method`` (strings), ``headers`` (``map(string, string)``,
  lower-case names), ``id``, ``route`` (strings), ``metadata`` (``map(string, dyn)``,
  the same as the top-level ``metadata``). The spec's spellings are accepted too:
  ``request.Path``, ``request.Method``, ``request.Headers``, ``request.Metadata``.
  In the response phase: the request as sent upstream.
* ``response``: ``status`` (int), ``headers``; also ``response.Status``,
  ``response.Headers``. Only the response phase has a response. A condition that
  reads ``response`` on a policy that runs *only* in the request phase is a config
  error (:attr:`Condition.reads_response`; :mod:`engine.config` checks it), rather
  than a runtime error that would fail the policy on every request. A policy with
  both phases evaluates its condition in each; in the request phase ``response`` is
  an empty map, so ``has(response.status)`` is false there: that is how such a
  condition picks the response phase (reading ``response.status`` unguarded in the
  request phase is a runtime error, i.e. that policy's failure).
* ``metadata``: what earlier policies of this request wrote (``map(string, dyn)``;
  a missing key is a runtime error, so guard with ``has(metadata.key)`` or
  ``"key" in metadata``).

``has(request.path)`` is true for every declared field (they are always present).

How: ``request`` and ``response`` are protobuf message types (descriptors built
here at import, no protoc) in the *checking* environment only. Evaluation compiles
the same expression against ``map(string, dyn)`` variables and is given plain
dicts holding just the fields the expression reads (found by walking the checked
AST), which is cheaper than building a message per request; the checked
environment has already guaranteed that those are the only fields it can read.
``matches()`` with a constant pattern is run once through cel-cpp's own RE2 at
config time, so an invalid pattern (RE2 syntax, not Python's) is a config error.

cel-expr-python does not raise on evaluation errors: it returns a value of type
``ERROR``. :meth:`Condition.evaluate` turns that, and any non-bool result, into
:class:`~engine.errors.ConditionEvaluationError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from cel.expr import checked_pb2, syntax_pb2
from cel_expr_python import cel
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, struct_pb2

from engine.errors import ConditionError, ConditionEvaluationError
from engine.policy import RequestContext, ResponseContext

__all__ = [
    "REQUEST_FIELDS",
    "RESPONSE_FIELDS",
    "VARIABLES",
    "Condition",
    "ConditionEvaluationError",
    "compile_condition",
    "read_paths",
    "request_data",
    "response_data",
]

VARIABLES: Final = ("request", "response", "metadata")

_Getter = Callable[[Any], Any]


def _plain(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    # The binding converts only real dicts (a MappingProxy is a "Non-CEL value");
    # engine.policy.RequestMetadata hands over its checked dict without a copy.
    if type(mapping) is dict:
        return mapping
    cel_view = getattr(mapping, "cel_view", None)
    return cel_view() if cel_view is not None else dict(mapping)


# Field -> (CEL type, how to read it from a RequestContext / ResponseContext).
_REQUEST: Final[Mapping[str, tuple[str, _Getter]]] = {
    "path": ("string", lambda c: c.path),
    "method": ("string", lambda c: c.method),
    "headers": ("headers", lambda c: _plain(c.headers)),
    "id": ("string", lambda c: c.request_id),
    "route": ("string", lambda c: c.route),
    "metadata": ("struct", lambda c: _plain(c.metadata)),
    "Path": ("string", lambda c: c.path),
    "Method": ("string", lambda c: c.method),
    "Headers": ("headers", lambda c: _plain(c.headers)),
    "Metadata": ("struct", lambda c: _plain(c.metadata)),
}
_RESPONSE: Final[Mapping[str, tuple[str, _Getter]]] = {
    "status": ("int", lambda c: c.status),
    "headers": ("headers", lambda c: _plain(c.headers)),
    "Status": ("int", lambda c: c.status),
    "Headers": ("headers", lambda c: _plain(c.headers)),
}
REQUEST_FIELDS: Final = tuple(_REQUEST)
RESPONSE_FIELDS: Final = tuple(_RESPONSE)

_PACKAGE: Final = "policy_engine.cel"


def _descriptor_pool() -> descriptor_pool.DescriptorPool:
    """``policy_engine.cel.Request`` and ``.Response`` (only for type checking)."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="policy_engine/cel/condition_types.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    scalar = {"string": field.TYPE_STRING, "int": field.TYPE_INT64}
    for message_name, fields in (("Request", _REQUEST), ("Response", _RESPONSE)):
        message = proto.message_type.add(name=message_name)
        entry = message.nested_type.add(name="HeadersEntry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
        entry.field.add(name="value", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
        for number, (name, (kind, _)) in enumerate(fields.items(), start=1):
            # json_name is explicit: `path` and `Path` would otherwise clash.
            spec = message.field.add(name=name, number=number, json_name=f"f{number}")
            if kind == "headers":
                spec.label = field.LABEL_REPEATED
                spec.type = field.TYPE_MESSAGE
                spec.type_name = f".{_PACKAGE}.{message_name}.HeadersEntry"
            elif kind == "struct":
                spec.label = field.LABEL_OPTIONAL
                spec.type = field.TYPE_MESSAGE
                spec.type_name = ".google.protobuf.Struct"  # CEL: map(string, dyn)
            else:
                spec.label = field.LABEL_OPTIONAL
                spec.type = scalar[kind]
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    return pool


_METADATA_TYPE: Final = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
_CHECK_ENV: Final = cel.NewEnv(
    descriptor_pool=_descriptor_pool(),
    variables={
        "request": cel.Type(f"{_PACKAGE}.Request"),
        "response": cel.Type(f"{_PACKAGE}.Response"),
        "metadata": _METADATA_TYPE,
    },
)
_EVAL_ENV: Final = cel.NewEnv(variables={name: _METADATA_TYPE for name in VARIABLES})
_NO_RESPONSE: Final[Mapping[str, Any]] = {}  # the request phase's `response` (read-only)
_REGEX_ENV: Final = cel.NewEnv(variables={"pattern": cel.Type.STRING})
_REGEX_PROBE: Final = _REGEX_ENV.compile('"".matches(pattern)')


class Condition:
    """A compiled CEL expression that yields a bool. Immutable; safe to share.

    ``reads_response`` says whether it reads ``response`` (so it can only run in the
    response phase). ``request_fields`` / ``response_fields`` are the fields it reads.
    """

    __slots__ = (
        "_metadata",
        "_program",
        "_request",
        "_response",
        "expression",
        "reads_response",
        "request_fields",
        "response_fields",
    )

    def __init__(
        self,
        expression: str,
        program: Any,
        request_fields: tuple[str, ...] = REQUEST_FIELDS,
        response_fields: tuple[str, ...] = RESPONSE_FIELDS,
        reads_metadata: bool = True,
    ) -> None:
        self.expression = expression
        self._program = program
        self.request_fields = request_fields
        self.response_fields = response_fields
        self.reads_response = bool(response_fields)
        self._request = tuple((name, _REQUEST[name][1]) for name in request_fields)
        self._response = tuple((name, _RESPONSE[name][1]) for name in response_fields)
        self._metadata = reads_metadata

    def evaluate_request(self, ctx: RequestContext) -> bool:
        """Evaluate in the request phase (no ``response``)."""
        data: dict[str, Any] = {}
        if self._request:
            data["request"] = {name: get(ctx) for name, get in self._request}
        if self._response:
            data["response"] = _NO_RESPONSE
        if self._metadata:
            data["metadata"] = _plain(ctx.metadata)
        return self.evaluate(data)

    def evaluate_response(self, ctx: ResponseContext) -> bool:
        """Evaluate in the response phase."""
        data: dict[str, Any] = {}
        if self._request:
            data["request"] = {name: get(ctx.request) for name, get in self._request}
        if self._response:
            data["response"] = {name: get(ctx) for name, get in self._response}
        if self._metadata:
            data["metadata"] = _plain(ctx.metadata)
        return self.evaluate(data)

    def evaluate(self, data: Mapping[str, Any]) -> bool:
        """Evaluate with ``data`` holding (plain dicts for) the variables it reads.

        Raises :class:`ConditionEvaluationError` for a runtime error (missing
        metadata key, wrong type, a value CEL cannot represent) or a non-bool result.
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
    CEL error text for a syntax error, an undeclared variable, an unknown field, a
    type error, an invalid constant ``matches()`` pattern, or an expression whose
    type is known not to be bool (``dyn`` results are checked per call)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ConditionError("must be a non-empty CEL expression")
    try:
        checked = _CHECK_ENV.compile(expression)
    except Exception as exc:  # cel-expr-python raises RuntimeError("INVALID_ARGUMENT: ...")
        raise ConditionError(_clean(str(exc))) from exc
    result = checked.return_type()
    if result not in (cel.Type.BOOL, cel.Type.DYN):
        raise ConditionError(f"must evaluate to bool, but its type is {result.name().lower()}")
    ast = _checked_ast(checked)
    for pattern in _constant_patterns(ast):
        problem = _regex_problem(pattern)
        if problem:
            raise ConditionError(f"matches({pattern!r}): {problem}")
    reads = _reads(ast)
    try:
        program = _EVAL_ENV.compile(expression)
    except Exception as exc:  # checked above; a failure here is an engine bug
        raise ConditionError(_clean(str(exc))) from exc
    return Condition(
        expression,
        program,
        request_fields=_fields(reads, "request", REQUEST_FIELDS),
        response_fields=_fields(reads, "response", RESPONSE_FIELDS),
        reads_metadata="metadata" in reads,
    )


# --------------------------------------------------------------------------- AST walking


def _checked_ast(program: Any) -> syntax_pb2.Expr:
    wrapper = any_pb2.Any.FromString(program.serialize())
    checked = checked_pb2.CheckedExpr()
    wrapper.Unpack(checked)
    return checked.expr


def _children(expr: syntax_pb2.Expr) -> Iterator[syntax_pb2.Expr]:
    kind = expr.WhichOneof("expr_kind")
    if kind == "select_expr":
        yield expr.select_expr.operand
    elif kind == "call_expr":
        if expr.call_expr.HasField("target"):
            yield expr.call_expr.target
        yield from expr.call_expr.args
    elif kind == "list_expr":
        yield from expr.list_expr.elements
    elif kind == "struct_expr":
        for entry in expr.struct_expr.entries:
            if entry.HasField("map_key"):
                yield entry.map_key
            yield entry.value
    elif kind == "comprehension_expr":
        c = expr.comprehension_expr
        yield from (c.iter_range, c.accu_init, c.loop_condition, c.loop_step, c.result)


def _walk(expr: syntax_pb2.Expr) -> Iterator[syntax_pb2.Expr]:
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(_children(node))


_WHOLE: Final = "*"


def _reads(ast: syntax_pb2.Expr) -> dict[str, set[str]]:
    """Variable -> fields read (``*`` when the variable is used as a whole)."""
    reads: dict[str, set[str]] = {}
    selected: set[int] = set()
    for node in _walk(ast):
        if node.WhichOneof("expr_kind") == "select_expr":
            operand = node.select_expr.operand
            if operand.WhichOneof("expr_kind") == "ident_expr":
                reads.setdefault(operand.ident_expr.name, set()).add(node.select_expr.field)
                selected.add(operand.id)
    for node in _walk(ast):
        if node.WhichOneof("expr_kind") == "ident_expr" and node.id not in selected:
            reads.setdefault(node.ident_expr.name, set()).add(_WHOLE)
    return reads


def _fields(
    reads: Mapping[str, set[str]], variable: str, known: tuple[str, ...]
) -> tuple[str, ...]:
    used = reads.get(variable, set())
    if _WHOLE in used:
        return known
    return tuple(name for name in known if name in used)


def _constant_patterns(ast: syntax_pb2.Expr) -> Iterator[str]:
    for node in _walk(ast):
        if node.WhichOneof("expr_kind") != "call_expr" or node.call_expr.function != "matches":
            continue
        args = node.call_expr.args
        pattern = args[0] if node.call_expr.HasField("target") else args[-1]
        if pattern.WhichOneof("expr_kind") == "const_expr":
            constant = pattern.const_expr
            if constant.WhichOneof("constant_kind") == "string_value":
                yield constant.string_value


def _regex_problem(pattern: str) -> str:
    """cel-cpp's own RE2 verdict on ``pattern``: "" if it compiles, else why not."""
    value = _REGEX_PROBE.eval(data={"pattern": pattern})
    if value.type() == cel.Type.ERROR:
        return str(value.value()).removeprefix("INVALID_ARGUMENT: ")
    return ""


def _clean(message: str) -> str:
    """``INVALID_ARGUMENT: ERROR: <input>:1:14: Syntax error: ...\n | expr\n | ^ [...]``
    -> ``1:14: Syntax error: ...``: one line per CEL error (line:column kept), without
    the status code and the caret drawing, which would break one-line config errors.
    Unknown fields list what the variable has."""
    message = message.strip().removeprefix("INVALID_ARGUMENT: ")
    found = [
        line.strip().removeprefix("ERROR: ").removeprefix("<input>:")
        for line in message.splitlines()
        if line.strip().startswith("ERROR: ")
    ]
    text = "; ".join(found) if found else message.removesuffix(" [INVALID_ARGUMENT]")
    for variable, fields in (("request", REQUEST_FIELDS), ("response", RESPONSE_FIELDS)):
        struct = f"not found in struct '{_PACKAGE}.{variable.capitalize()}'"
        text = text.replace(struct, f"in {variable} (it has: {', '.join(fields)})")
    return text


# --------------------------------------------------------------------------- full data


def _request_map(ctx: RequestContext) -> dict[str, Any]:
    return {name: get(ctx) for name, (_, get) in _REQUEST.items()}


def request_data(ctx: RequestContext) -> dict[str, Any]:
    """Every request-phase variable, every field (tests, tools); ``response`` is empty."""
    return {
        "request": _request_map(ctx),
        "response": _NO_RESPONSE,
        "metadata": _plain(ctx.metadata),
    }


def response_data(ctx: ResponseContext) -> dict[str, Any]:
    """Every response-phase variable, every field (tests, tools)."""
    return {
        "request": _request_map(ctx.request),
        "response": {name: get(ctx) for name, (_, get) in _RESPONSE.items()},
        "metadata": _plain(ctx.metadata),
    }


# --------------------------------------------------------------------------- what it reads


def _read_path(node: syntax_pb2.Expr) -> tuple[str, ...] | None:
    """``request.headers`` -> ("request", "headers"); ``metadata`` -> ("metadata",)."""
    kind = node.WhichOneof("expr_kind")
    if kind == "ident_expr":
        return (node.ident_expr.name,)
    if kind == "select_expr":
        operand = _read_path(node.select_expr.operand)
        return None if operand is None else (*operand, node.select_expr.field)
    return None


def _constant_key(node: syntax_pb2.Expr) -> str | None:
    if node.WhichOneof("expr_kind") == "const_expr":
        constant = node.const_expr
        if constant.WhichOneof("constant_kind") == "string_value":
            return str(constant.string_value)
    return None


def read_paths(expression: str) -> list[tuple[str, ...]]:
    """What ``expression`` reads, as paths from a variable, in order of appearance without
    repeats: ``request.path`` -> ("request", "path"), ``request.headers["x-env"]`` and
    ``"x-env" in request.headers`` -> ("request", "headers", "x-env"), ``metadata.user`` ->
    ("metadata", "user"). A map read with a key that is not a constant is the whole map.
    For explanations (engine/explain.py), not for the request path: it parses again."""
    try:
        ast = _checked_ast(_CHECK_ENV.compile(expression))
    except Exception:  # not a valid condition: it reads nothing we can show
        return []
    found: dict[tuple[str, ...], int] = {}  # path -> the id of its first read (parse order)
    inner: set[int] = set()  # nodes read as part of a longer path
    for node in _walk(ast):
        kind = node.WhichOneof("expr_kind")
        path: tuple[str, ...] | None = None
        if kind == "call_expr" and node.call_expr.function in ("_[_]", "@in"):
            args = node.call_expr.args
            container, key = (
                (args[0], args[1])
                if node.call_expr.function == "_[_]"
                else (
                    args[1],
                    args[0],
                )
            )
            base, constant = _read_path(container), _constant_key(key)
            if base is not None and base[0] in VARIABLES and constant is not None:
                path = (*base, constant)
                inner.add(container.id)
        elif kind == "select_expr":
            path = _read_path(node)
            if path is not None:
                inner.add(node.select_expr.operand.id)
        elif kind == "ident_expr" and node.ident_expr.name in VARIABLES:
            path = (node.ident_expr.name,)
        if path is not None and path[0] in VARIABLES and node.id not in inner:
            found[path] = min(node.id, found.get(path, node.id))
    return sorted(found, key=found.__getitem__)
