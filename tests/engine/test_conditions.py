"""Tests of engine.conditions: compile-time checks and runtime evaluation of CEL."""

from __future__ import annotations

from typing import Any

import pytest

from engine.conditions import compile_condition, request_data, response_data
from engine.errors import ConditionError, ConditionEvaluationError
from engine.testing import make_request_context, make_response_context


def data(
    *, path: str = "/api/users", method: str = "GET", metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    ctx = make_request_context(
        path=path, method=method, headers={"x-env": "prod"}, metadata=metadata or {}
    )
    return request_data(ctx)


@pytest.mark.parametrize(
    ("expression", "variables", "expected"),
    [
        pytest.param('request.path.startsWith("/api/")', data(), True, id="prefix-match"),
        pytest.param(
            'request.path.startsWith("/api/")', data(path="/health"), False, id="prefix-miss"
        ),
        pytest.param(
            'request.method in ["POST", "PUT", "DELETE"]', data(method="PUT"), True, id="in-list"
        ),
        pytest.param(
            'request.method in ["POST", "PUT", "DELETE"]',
            data(method="GET"),
            False,
            id="not-in-list",
        ),
        pytest.param(
            'metadata.environment == "staging"',
            data(metadata={"environment": "staging"}),
            True,
            id="metadata-eq",
        ),
        pytest.param("has(metadata.user)", data(metadata={"user": "u1"}), True, id="has-true"),
        pytest.param("has(metadata.user)", data(), False, id="has-false"),
        pytest.param('request.headers["x-env"] != "prod"', data(), False, id="header-index"),
        pytest.param(
            'request.route == "test" && request.id == "req-1"', data(), True, id="route-and-id"
        ),
        pytest.param('request.Path.startsWith("/api/")', data(), True, id="spec-Path"),
        pytest.param('request.Method in ["GET"]', data(), True, id="spec-Method"),
        pytest.param('request.Headers["x-env"] == "prod"', data(), True, id="spec-Headers"),
        pytest.param(
            'request.Metadata["environment"] == "staging"',
            data(metadata={"environment": "staging"}),
            True,
            id="spec-Metadata",
        ),
        pytest.param(
            'request.metadata.environment == "staging"',
            data(metadata={"environment": "staging"}),
            True,
            id="request-metadata",
        ),
        pytest.param("has(request.path) && has(request.id)", data(), True, id="has-field"),
        pytest.param("has(response.status)", data(), False, id="no-response-in-request-phase"),
        pytest.param(
            "metadata.authenticated == true && metadata.level > 2",
            data(metadata={"authenticated": True, "level": 3}),
            True,
            id="bool-and-int",
        ),
        pytest.param(
            'request.path.matches("^/api/v[0-9]+/")', data(path="/api/v2/x"), True, id="regex"
        ),
        pytest.param("false || metadata.missing", data(), None, id="error-or-false"),
        pytest.param("true || metadata.missing", data(), True, id="error-or-true"),
    ],
)
def test_evaluate(expression: str, variables: dict[str, Any], expected: bool | None) -> None:
    condition = compile_condition(expression)
    if expected is None:
        with pytest.raises(ConditionEvaluationError):
            condition.evaluate(variables)
    else:
        assert condition.evaluate(variables) is expected


def test_spec_spellings_in_the_response_phase() -> None:
    ctx = make_response_context(status=201, headers={"x-up": "1"})
    condition = compile_condition('response.Status == 201 && response.Headers["x-up"] == "1"')
    assert condition.evaluate_response(ctx) is True


def test_conditions_read_only_the_fields_they_name() -> None:
    condition = compile_condition('request.Path.startsWith("/api/") && has(metadata.user)')
    assert (condition.request_fields, condition.response_fields) == (("Path",), ())
    assert not condition.reads_response
    both = compile_condition("request == request")  # a whole variable: every field
    assert len(both.request_fields) == 10
    reads = compile_condition('response.status == 200 && request.method == "GET"')
    assert reads.reads_response
    assert (reads.request_fields, reads.response_fields) == (("method",), ("status",))


def test_re2_syntax_python_rejects_is_accepted() -> None:
    condition = compile_condition(r'request.path.matches("^/\\p{Greek}+$")')
    assert condition.evaluate_request(make_request_context(path="/αβγ")) is True


def test_response_phase_variables() -> None:
    request = make_request_context(path="/api/x", metadata={"flag": True})
    ctx = make_response_context(request, status=503, headers={"Content-Type": "text/plain"})
    condition = compile_condition(
        'response.status >= 500 && response.headers["content-type"] == "text/plain" '
        '&& request.path == "/api/x" && metadata.flag'
    )
    assert condition.evaluate(response_data(ctx)) is True


@pytest.mark.parametrize(
    ("expression", "variables", "message"),
    [
        pytest.param(
            'metadata.environment == "staging"',
            data(),
            "condition 'metadata.environment == \"staging\"' failed: "
            'NOT_FOUND: Key not found in map : "environment"',
            id="missing-key",
        ),
        pytest.param(
            "metadata.level > 2",
            data(metadata={"level": "high"}),
            "failed: UNKNOWN: No matching overloads found : _>_(string, int64)",
            id="wrong-type",
        ),
        pytest.param(
            "metadata.v", data(metadata={"v": "x"}), "returned string, not bool", id="non-bool"
        ),
        pytest.param(
            "request.path.matches(metadata.p)",
            data(metadata={"p": "("}),
            "invalid regular expression: missing ): (",
            id="runtime-pattern",
        ),
    ],
)
def test_runtime_errors_raise(expression: str, variables: dict[str, Any], message: str) -> None:
    condition = compile_condition(expression)
    with pytest.raises(ConditionEvaluationError) as info:
        condition.evaluate(variables)
    assert message in str(info.value)
    assert isinstance(info.value, ConditionError)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        pytest.param(
            'request.path.startsWith("/api/"',
            "1:32: Syntax error: missing ')' at '<EOF>'",
            id="syntax",
        ),
        pytest.param(
            'req.path == "/"',
            "1:4: undeclared reference to 'req.path' (in container '')",
            id="undeclared-variable",
        ),
        pytest.param("1 + 2", "must evaluate to bool, but its type is int", id="int-result"),
        pytest.param("request.path", "must evaluate to bool, but its type is string", id="string"),
        pytest.param(
            'request.pathh.startsWith("/api/")',
            "1:8: undefined field 'pathh' in request (it has: path, method, headers, id, route, "
            "metadata, Path, Method, Headers, Metadata)",
            id="unknown-request-field",
        ),
        pytest.param(
            "response.code == 200",
            "1:9: undefined field 'code' in response (it has: status, headers, Status, Headers)",
            id="unknown-response-field",
        ),
        pytest.param(
            "request.path > 5",
            "1:14: found no matching overload for '_>_' applied to '(string, int)'",
            id="type-error",
        ),
        pytest.param(
            'request.path.matches("(")',
            "matches('('): invalid regular expression: missing ): (",
            id="bad-pattern",
        ),
        pytest.param(
            'matches(request.method, "[z-a]")',
            "matches('[z-a]'): invalid regular expression: invalid character class range: z-a",
            id="bad-pattern-global-form",
        ),
        pytest.param(
            'request.path.matches("^/(?=api)")',  # fine for Python's re, not for RE2
            "matches('^/(?=api)'): invalid regular expression: invalid perl operator: (?=",
            id="lookahead-is-not-re2",
        ),
        pytest.param(
            'true || request.path.matches("x**")',
            "matches('x**'): invalid regular expression: bad repetition operator: **",
            id="bad-pattern-never-evaluated",
        ),
        pytest.param("   ", "must be a non-empty CEL expression", id="blank"),
    ],
)
def test_compile_errors(expression: str, message: str) -> None:
    with pytest.raises(ConditionError) as info:
        compile_condition(expression)
    assert str(info.value) == message
    assert not isinstance(info.value, ConditionEvaluationError)


def test_condition_repr_and_expression() -> None:
    condition = compile_condition("true")
    assert condition.expression == "true"
    assert repr(condition) == "Condition('true')"


def test_request_phase_of_a_two_phase_condition_has_an_empty_response() -> None:
    condition = compile_condition("!has(response.status) || response.status >= 500")
    assert condition.evaluate_request(make_request_context()) is True
    assert condition.evaluate_response(make_response_context(status=503)) is True
    assert condition.evaluate_response(make_response_context(status=200)) is False
