"""Tests of jsonTransform v1.0.0: paths, set/remove, bad bodies in both phases."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.policy import (
    ImmediateResponse,
    ParameterError,
    RequestContext,
    RequestModifications,
    ResponseContext,
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


def request_ctx(body: bytes | None) -> RequestContext:
    return make_request_context(
        headers={"content-type": "application/json"}, method="POST", body=body
    )


def response_ctx(body: bytes | None) -> ResponseContext:
    return make_response_context(request_ctx(None), body=body)


def test_definition_examples_behave_as_declared() -> None:
    assert POLICY.check_examples() == []


def test_definition_declares_body_needs() -> None:
    assert POLICY.definition.requires_request_body
    assert POLICY.definition.requires_response_body


@pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
def test_valid_examples_construct(example: Mapping[str, Any]) -> None:
    construct(POLICY, example["parameters"])


@pytest.mark.parametrize(
    ("ops", "body", "expected"),
    [
        pytest.param({"set": {"a": 1}}, {}, {"a": 1}, id="set-top-level"),
        pytest.param(
            {"set": {"a.b.c": "x"}},
            {"a": {"z": 0}},
            {"a": {"z": 0, "b": {"c": "x"}}},
            id="set-creates-intermediate-objects",
        ),
        pytest.param(
            {"set": {"a": {"k": [1, None]}}},
            {"a": 1},
            {"a": {"k": [1, None]}},
            id="set-replaces-with-structured-value",
        ),
        pytest.param(
            {"set": {"items.1.id": 7}},
            {"items": [{"id": 1}, {"id": 2}]},
            {"items": [{"id": 1}, {"id": 7}]},
            id="set-array-element-member",
        ),
        pytest.param(
            {"set": {"m.0": "x"}},
            {"m": {}},
            {"m": {"0": "x"}},
            id="digits-are-object-keys-in-objects",
        ),
        pytest.param(
            {"remove": ["secret", "user.hash"]},
            {"secret": 1, "user": {"hash": "h", "name": "n"}},
            {"user": {"name": "n"}},
            id="remove-fields",
        ),
        pytest.param(
            {"remove": ["tags.0"]}, {"tags": ["a", "b"]}, {"tags": ["b"]}, id="remove-array-element"
        ),
        pytest.param(
            {"remove": ["a"], "set": {"a.b": 1}},
            {"a": "old"},
            {"a": {"b": 1}},
            id="remove-runs-before-set",
        ),
        pytest.param({"set": {"name": "Zoë"}}, {"name": "x"}, {"name": "Zoë"}, id="unicode"),
    ],
)
def test_request_transformations(ops: dict[str, Any], body: Any, expected: Any) -> None:
    action = construct(POLICY, {"request": ops}).on_request(request_ctx(json.dumps(body).encode()))
    assert isinstance(action, RequestModifications)
    assert action.body is not None
    assert json.loads(action.body) == expected
    assert action.set_headers == {}  # the engine fixes content-length, not the policy


@pytest.mark.parametrize(
    ("ops", "body"),
    [
        pytest.param(
            {"remove": ["missing", "a.missing", "list.5"]},
            {"a": {}, "list": [1]},
            id="remove-missing-paths",
        ),
        pytest.param({"set": {"a.b": 1}}, {"a": 5}, id="set-through-a-scalar"),
        pytest.param({"set": {"list.3": 1}}, {"list": [0]}, id="set-past-array-end"),
        pytest.param({"set": {"list.x.y": 1}}, {"list": [0]}, id="set-non-index-into-array"),
    ],
)
def test_inapplicable_operations_change_nothing(ops: dict[str, Any], body: Any) -> None:
    policy = construct(POLICY, {"request": ops})
    assert policy.on_request(request_ctx(json.dumps(body).encode())) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"not json", "request body is not valid JSON", id="text"),
        pytest.param(b'{"a": 1', "request body is not valid JSON", id="truncated"),
        pytest.param(b"\xff\xfe\x00", "request body is not valid JSON", id="binary"),
        pytest.param(b'{"a": NaN}', "request body is not valid JSON", id="nan"),
        pytest.param(b"[1, 2]", "request body must be a JSON object, not list", id="array"),
        pytest.param(b'"text"', "request body must be a JSON object, not str", id="string"),
        pytest.param(b"[" * 100_000, "request body", id="deeply-nested"),
    ],
)
def test_bad_request_body_is_a_400(body: bytes, message: str) -> None:
    action = construct(POLICY, {"request": {"set": {"a": 1}}}).on_request(request_ctx(body))
    assert isinstance(action, ImmediateResponse)
    assert action.status == 400
    assert action.headers["content-type"] == "application/json"
    payload = json.loads(action.body)
    assert payload["error"] == "bad_request"
    assert message in payload["message"]


@pytest.mark.parametrize("body", [None, b""], ids=["absent", "empty"])
def test_no_body_is_left_alone(body: bytes | None) -> None:
    policy = construct(POLICY, {"request": {"set": {"a": 1}}, "response": {"set": {"a": 1}}})
    assert policy.on_request(request_ctx(body)) is None
    assert policy.on_response(response_ctx(body)) is None


def test_response_transformation() -> None:
    policy = construct(
        POLICY, {"response": {"remove": ["user.passwordHash"], "set": {"served": True}}}
    )
    body = json.dumps({"user": {"id": 1, "passwordHash": "x"}}).encode()
    action = policy.on_response(response_ctx(body))
    assert isinstance(action, ResponseModifications)
    assert action.body is not None
    assert json.loads(action.body) == {"user": {"id": 1}, "served": True}
    assert action.status is None


def test_non_json_response_passes_unchanged_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = construct(POLICY, {"response": {"set": {"a": 1}}})
    with caplog.at_level(logging.WARNING):
        assert policy.on_response(response_ctx(b"<html>502 Bad Gateway</html>")) is None
    assert "left unchanged" in caplog.text
    assert "req-1" in caplog.text


def test_phase_without_operations_is_skipped() -> None:
    policy = construct(POLICY, {"response": {"set": {"a": 1}}})
    assert policy.on_request(request_ctx(b"not json")) is None


def test_configured_values_are_not_shared_between_requests() -> None:
    policy = construct(POLICY, {"request": {"set": {"obj": {"n": 1}, "obj.extra": 2}}})
    first = policy.on_request(request_ctx(b"{}"))
    second = policy.on_request(request_ctx(b"{}"))
    assert json.loads(first.body) == json.loads(second.body) == {"obj": {"n": 1, "extra": 2}}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        pytest.param({"request": {"set": {"a..b": 1}}}, "request.set.a..b", id="empty-segment"),
        pytest.param({"request": {"set": {".a": 1}}}, "request.set..a", id="leading-dot"),
        pytest.param({"response": {"remove": ["a."]}}, "response.remove[0]", id="trailing-dot"),
        pytest.param({}, "request", id="nothing-configured"),
        pytest.param({"request": {}, "response": {"remove": []}}, "request", id="empty-ops"),
    ],
)
def test_parameter_errors(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ParameterError) as info:
        construct(POLICY, params)
    assert info.value.field == field


def test_nan_value_rejected_by_engine_and_constructor() -> None:
    params = {"request": {"set": {"a": float("nan")}}}
    _, errors = POLICY.definition.validate_parameters(params)
    assert errors == ["request.set.a: must be a finite number, got nan"]
    with pytest.raises(ParameterError) as info:  # the constructor's own check stays
        POLICY.factory(params)
    assert info.value.field == "request.set.a"


# --------------------------------------------------------------------------- fail safe (issue 8)


def test_lone_surrogate_in_a_body_is_a_clear_outcome(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 8 item 9: "\\ud800" parsed, then failed to serialise (UnicodeEncodeError
    out of the hook). It is not valid Unicode, so the body is not valid JSON."""
    body = b'{"name": "\\ud800", "ok": 1}'
    policy = construct(POLICY, {"request": {"set": {"a": 1}}, "response": {"set": {"a": 1}}})
    action = policy.on_request(request_ctx(body))
    assert isinstance(action, ImmediateResponse)
    assert action.status == 400
    assert "request body is not valid JSON" in json.loads(action.body)["message"]
    with caplog.at_level(logging.WARNING):
        assert policy.on_response(response_ctx(body)) is None
    assert "left unchanged" in caplog.text


def test_numbers_round_trip_exactly() -> None:
    # Untouched members are written back byte for byte (their raw JSON text).
    body = b'{"id": 123456789012345678901234567890, "f": 0.1, "n": -0, "u": "\\u00e9"}'
    action = construct(POLICY, {"request": {"set": {"x": True}}}).on_request(request_ctx(body))
    assert isinstance(action, RequestModifications)
    assert action.body == (
        b'{"id":123456789012345678901234567890,"f":0.1,"n":-0,"u":"\\u00e9","x":true}'
    )
    # A member an operation reaches into is decoded and written compactly.
    body = b'{"user": {"id": 123456789012345678901234567890, "f": 0.1}, "keep": [1,  2]}'
    action = construct(POLICY, {"request": {"set": {"user.x": 1}}}).on_request(request_ctx(body))
    assert (
        action.body
        == b'{"user":{"id":123456789012345678901234567890,"f":0.1,"x":1},"keep":[1,  2]}'
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b'{"a": 1, "deep": [1, {"b": }]}', "not valid JSON", id="malformed-member"),
        pytest.param(b'{"a": 1, "deep": ["\xff"]}', "not valid JSON", id="bad-utf8-member"),
        pytest.param(
            b'{"a": 1, "deep": ["\\udc00"]}', "not valid JSON", id="lone-surrogate-member"
        ),
    ],
)
def test_members_no_operation_touches_are_still_checked(body: bytes, message: str) -> None:
    action = construct(POLICY, {"request": {"remove": ["a"]}}).on_request(request_ctx(body))
    assert isinstance(action, ImmediateResponse)
    assert action.status == 400
    assert message in json.loads(action.body)["message"]


def big_body(size: int) -> bytes:
    """A JSON object of at least ``size`` bytes."""
    users = [{"id": i, "name": f"user {i}", "tags": ["a", "b"]} for i in range(size // 40)]
    return json.dumps({"internal": 1, "users": users}).encode()


def test_request_body_over_max_body_bytes_is_a_413() -> None:
    """Issue 8 item 12: a 4.5 MiB body was parsed on the event loop (207 ms) while
    every other request waited. Bodies over maxBodyBytes (default 1 MiB) are not
    parsed at all."""
    body = big_body(int(4.5 * 2**20))
    action = construct(POLICY, {"request": {"remove": ["internal"]}}).on_request(request_ctx(body))
    assert isinstance(action, ImmediateResponse)
    assert action.status == 413
    assert json.loads(action.body)["error"] == "payload_too_large"
    raised = construct(POLICY, {"request": {"remove": ["internal"]}, "maxBodyBytes": 8 << 20})
    action = raised.on_request(request_ctx(body))
    assert isinstance(action, RequestModifications)
    assert action.body is not None
    assert "internal" not in json.loads(action.body)


def test_response_body_over_max_body_bytes_fails_the_policy() -> None:
    """Passing it unchanged could leak a field the policy is configured to remove."""
    from engine.errors import PolicyError

    policy = construct(POLICY, {"response": {"remove": ["internal"]}, "maxBodyBytes": 1000})
    with pytest.raises(PolicyError, match="larger than maxBodyBytes"):
        policy.on_response(response_ctx(big_body(2000)))
    assert policy.on_response(response_ctx(b'{"internal": 1}')) is not None


def test_constructor_work_on_set_values_is_bounded() -> None:
    """A value sharing sub-structures (what YAML aliases build) is counted node by
    node, never expanded in full: a million-node value is rejected at once."""
    value: Any = [0] * 10
    for _ in range(5):
        value = [value] * 10  # 10**6 leaves, a few hundred objects
    with pytest.raises(ParameterError) as info:
        POLICY.factory({"request": {"set": {"big": value}}})
    assert info.value.field == "request.set.big"
    assert "more than 10000 JSON nodes" in info.value.message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("\ud800", "cannot be written as JSON", id="lone-surrogate"),
        pytest.param({1: "x"}, "object keys must be strings", id="non-string-key"),
        pytest.param({"a": [float("inf")]}, "must be a finite number", id="nested-infinity"),
        pytest.param({"a": {1, 2}}, "set is not a JSON value", id="python-set"),
    ],
)
def test_set_values_must_be_plain_json(value: Any, message: str) -> None:
    with pytest.raises(ParameterError) as info:
        POLICY.factory({"response": {"set": {"a.b": value}}})
    assert info.value.field == "response.set.a.b"
    assert message in info.value.message
