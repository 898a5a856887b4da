"""Tests of respond v1.0.0: definition examples, config-time rejections, the response."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.policy import ImmediateResponse, ParameterError, RequestContext
from engine.registry import load_policy
from engine.testing import construct, example_id, make_request_context, valid_examples

FOLDER = Path(__file__).resolve().parents[1]
POLICY = load_policy(FOLDER)


def request_ctx() -> RequestContext:
    return make_request_context(path="/anything", method="POST")


def test_definition_examples_behave_as_declared() -> None:
    assert POLICY.check_examples() == []


@pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
def test_valid_examples_construct(example: Mapping[str, Any]) -> None:
    construct(POLICY, example["parameters"])


def test_defaults_answer_200_with_empty_body() -> None:
    action = construct(POLICY, {}).on_request(request_ctx())
    assert action == ImmediateResponse(status=200, headers={}, body=b"")


def test_configured_response_is_returned() -> None:
    policy = construct(
        POLICY,
        {
            "status": 503,
            "headers": {"Content-Type": "text/html; charset=utf-8", "retry-after": "120"},
            "body": "<h1>Wartung läuft</h1>",
        },
    )
    action = policy.on_request(request_ctx())
    assert isinstance(action, ImmediateResponse)
    assert action.status == 503
    assert dict(action.headers) == {
        "content-type": "text/html; charset=utf-8",
        "retry-after": "120",
    }
    assert action.body == "<h1>Wartung läuft</h1>".encode()


@pytest.mark.parametrize(
    ("headers", "field", "message"),
    [
        pytest.param(
            {"x-a\r\nx-b": "v"}, "headers.x-a\r\nx-b", "not a valid header name", id="crlf-in-name"
        ),
        pytest.param({"": "v"}, "headers.", "not a valid header name", id="empty-name"),
        pytest.param(
            {"x-a": "v\r\nset-cookie: a=b"},
            "headers.x-a",
            "without CR, LF or NUL",
            id="crlf-in-value",
        ),
        pytest.param({"x-a": "v\x00"}, "headers.x-a", "without CR, LF or NUL", id="nul-in-value"),
        pytest.param(
            {"X-A": "1", "x-a": "2"},
            "headers.x-a",
            "configured twice",
            id="duplicate-name-ignoring-case",
        ),
    ],
)
def test_header_rejections(headers: dict[str, str], field: str, message: str) -> None:
    with pytest.raises(ParameterError) as info:
        construct(POLICY, {"headers": headers})
    assert info.value.field == field
    assert message in info.value.message


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param(199, "is less than the minimum of 200", id="below-range"),
        pytest.param(600, "is greater than the maximum of 599", id="above-range"),
        pytest.param(200.5, "is not of type 'integer'", id="not-integer"),
    ],
)
def test_status_range(status: object, expected: str) -> None:
    _, errors = POLICY.definition.validate_parameters({"status": status})
    assert len(errors) == 1
    assert errors[0].startswith("status: ")
    assert expected in errors[0]
