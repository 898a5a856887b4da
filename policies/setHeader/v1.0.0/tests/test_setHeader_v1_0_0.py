"""Tests of setHeader v1.0.0: definition examples, config-time rejections, hooks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.policy import (
    ParameterError,
    RequestContext,
    RequestModifications,
    ResponseModifications,
)
from engine.registry import load_policy
from engine.testing import (
    construct,
    example_id,
    make_request_context,
    make_response_context,
    valid_examples,
)

FOLDER = Path(__file__).resolve().parents[1]
POLICY = load_policy(FOLDER)


def request_ctx() -> RequestContext:
    return make_request_context(headers={"x-existing": "1"})


def test_definition_examples_behave_as_declared() -> None:
    assert POLICY.check_examples() == []


@pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
def test_valid_examples_construct(example: Mapping[str, Any]) -> None:
    construct(POLICY, example["parameters"])


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        pytest.param(
            {"request": {"set": {"x-a\r\nx-b": "v"}}},
            "request.set.x-a\r\nx-b",
            "not a valid header name",
            id="crlf-in-name",
        ),
        pytest.param(
            {"request": {"set": {"x a": "v"}}},
            "request.set.x a",
            "not a valid header name",
            id="space-in-name",
        ),
        pytest.param(
            {"response": {"append": {"x:a": "v"}}},
            "response.append.x:a",
            "not a valid header name",
            id="colon-in-name",
        ),
        pytest.param(
            {"request": {"set": {":path": "/admin"}}},
            "request.set.:path",
            "not a valid header name",
            id="pseudo-header",
        ),
        pytest.param(
            {"request": {"set": {"x-a": "v\r\nx-b: evil"}}},
            "request.set.x-a",
            "must not contain CR, LF or NUL",
            id="crlf-in-value",
        ),
        pytest.param(
            {"request": {"set": {"x-a": "v\n"}}},
            "request.set.x-a",
            "must not contain CR, LF or NUL",
            id="trailing-lf-in-value",
        ),
        pytest.param(
            {"response": {"append": {"x-a": "v\x00"}}},
            "response.append.x-a",
            "must not contain CR, LF or NUL",
            id="nul-in-value",
        ),
        pytest.param(
            {"request": {"remove": ["x-a\n"]}},
            "request.remove[0]",
            "not a valid header name",
            id="lf-in-removed-name",
        ),
        pytest.param(
            {"request": {"set": {"X-A": "1"}, "remove": ["x-a"]}},
            "request.remove[0]",
            "already appears in request.set",
            id="set-and-remove-same-header",
        ),
        pytest.param(
            {"request": {"set": {"x-a": "1"}, "append": {"X-a": "2"}}},
            "request.append.X-a",
            "already appears in request.set",
            id="set-and-append-same-header",
        ),
        pytest.param({}, "request", "configure header operations", id="nothing-configured"),
        pytest.param(
            {"request": {}, "response": {}},
            "request",
            "configure header operations",
            id="empty-phases",
        ),
    ],
)
def test_config_rejections(params: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ParameterError) as info:
        construct(POLICY, params)
    assert info.value.field == field
    assert message in info.value.message


def test_request_operations_are_lower_cased() -> None:
    policy = construct(
        POLICY,
        {"request": {"set": {"X-Env": "staging"}, "append": {"Via": "pe"}, "remove": ["X-Secret"]}},
    )
    action = policy.on_request(request_ctx())
    assert isinstance(action, RequestModifications)
    assert dict(action.set_headers) == {"x-env": "staging"}
    assert dict(action.append_headers) == {"via": "pe"}
    assert action.remove_headers == ("x-secret",)


def test_response_operations() -> None:
    policy = construct(
        POLICY, {"response": {"set": {"cache-control": "no-store"}, "remove": ["server"]}}
    )
    ctx = make_response_context(request_ctx(), headers={"server": "x"})
    action = policy.on_response(ctx)
    assert isinstance(action, ResponseModifications)
    assert dict(action.set_headers) == {"cache-control": "no-store"}
    assert action.remove_headers == ("server",)


@pytest.mark.parametrize(
    ("params", "request_changes", "response_changes"),
    [
        pytest.param({"request": {"set": {"x-a": "1"}}}, True, False, id="request-only"),
        pytest.param({"response": {"set": {"x-a": "1"}}}, False, True, id="response-only"),
        pytest.param(
            {"request": {"remove": ["x-a"]}, "response": {"remove": ["x-b"]}}, True, True, id="both"
        ),
    ],
)
def test_phase_without_operations_returns_none(
    params: dict[str, Any], request_changes: bool, response_changes: bool
) -> None:
    policy = construct(POLICY, params)
    ctx = make_response_context(request_ctx())
    assert (policy.on_request(request_ctx()) is not None) is request_changes
    assert (policy.on_response(ctx) is not None) is response_changes
    # Declared static: the same actions, known at config load (None drops the phase).
    assert policy.static_request() is policy.on_request(request_ctx())
    assert policy.static_response() is policy.on_response(ctx)


def test_empty_value_is_allowed() -> None:
    action = construct(POLICY, {"request": {"set": {"x-empty": ""}}}).on_request(request_ctx())
    assert dict(action.set_headers) == {"x-empty": ""}


def test_configured_mapping_cannot_be_mutated_through_the_action() -> None:
    action = construct(POLICY, {"request": {"set": {"x-a": "1"}}}).on_request(request_ctx())
    with pytest.raises(TypeError):
        action.set_headers["x-b"] = "2"
