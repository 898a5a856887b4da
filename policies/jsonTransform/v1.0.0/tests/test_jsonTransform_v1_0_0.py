"""Tests of jsonTransform v1.0.0: paths, set/remove, bad bodies in both phases."""

from __future__ import annotations

import gzip
import inspect
import json
import sys
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.errors import PolicyError
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
    # A member a path reaches into exists, so the body is written from what was read
    # (see test_duplicate_names_collapse_to_what_the_policy_read): equal JSON.
    policy = construct(POLICY, {"request": ops})
    action = policy.on_request(request_ctx(json.dumps(body).encode()))
    assert isinstance(action, RequestModifications)
    assert action.body is not None
    assert json.loads(action.body) == body


def test_a_body_no_path_reaches_passes_as_it_came() -> None:
    policy = construct(POLICY, {"request": {"remove": ["user.password", "secret"]}})
    assert policy.on_request(request_ctx(b'{"other": {"password": 1}}')) is None


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
    assert construct(POLICY, {"request": {"set": {"a": 1}}}).on_request(request_ctx(body)) is None
    policy = construct(POLICY, {"request": {"set": {"a": 1}}, "response": {"set": {"a": 1}}})
    action = policy.on_request(request_ctx(body))
    assert isinstance(action, RequestModifications)
    assert action.body is None  # only accept-encoding (test_response_routes_ask_for_identity)
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


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"<html>502 Bad Gateway</html>", "not valid JSON", id="html"),
        pytest.param(b'{"user": {"password": "s"}, "x": NaN}', "not valid JSON", id="nan"),
        pytest.param(
            b'[{"user": {"password": "s"}}]', "must be a JSON object, not list", id="array"
        ),
        pytest.param(b'"text"', "must be a JSON object, not str", id="string"),
        pytest.param(b'{"user": {"password": "\xff"}}', "not valid JSON", id="bad-utf8"),
    ],
)
def test_unreadable_response_fails_the_policy(body: bytes, message: str) -> None:
    """Issue 16 item 8: these passed unchanged, so a client whose parser reads them
    (Python's json reads NaN; a list endpoint on the route) got the removed field."""
    policy = construct(POLICY, {"response": {"remove": ["user.password"]}})
    with pytest.raises(PolicyError, match=message):
        policy.on_response(response_ctx(body))


def test_phase_without_operations_is_skipped() -> None:
    # The response-only transform runs in the request phase for its header only.
    action = construct(POLICY, {"response": {"set": {"a": 1}}}).on_request(request_ctx(b"x"))
    assert action == RequestModifications(set_headers={"accept-encoding": "identity"})
    policy = construct(POLICY, {"request": {"set": {"a": 1}}})
    assert policy.on_response(response_ctx(b"not json")) is None


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


def test_lone_surrogate_in_a_body_is_a_clear_outcome() -> None:
    """Issue 8 item 9: "\\ud800" parsed, then failed to serialise (UnicodeEncodeError
    out of the hook). It is not valid Unicode, so the body is not valid JSON."""
    body = b'{"name": "\\ud800", "ok": 1}'
    policy = construct(POLICY, {"request": {"set": {"a": 1}}, "response": {"set": {"a": 1}}})
    action = policy.on_request(request_ctx(body))
    assert isinstance(action, ImmediateResponse)
    assert action.status == 400
    assert "request body is not valid JSON" in json.loads(action.body)["message"]
    with pytest.raises(PolicyError, match="not valid JSON"):
        policy.on_response(response_ctx(body))


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


# ----------------------------------------------------------- issue 16: codings, BOM, duplicates

SECRET = {"user": {"name": "dana", "password": "s3cret"}, "id": 7}


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


def coded_response_ctx(body: bytes, encoding: str) -> ResponseContext:
    return make_response_context(
        request_ctx(None), headers={"content-encoding": encoding}, body=body
    )


async def resolve(action: Any) -> Any:
    return await action if inspect.isawaitable(action) else action


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        pytest.param("gzip", gzipped, id="gzip"),
        pytest.param("x-gzip", gzipped, id="x-gzip"),
        pytest.param("deflate", zlib.compress, id="deflate-zlib"),
        pytest.param("deflate", raw_deflate, id="deflate-raw"),
        pytest.param("deflate, gzip", lambda d: gzipped(zlib.compress(d)), id="stacked"),
        pytest.param("GZIP", lambda d: gzipped(d[:10]) + gzipped(d[10:]), id="gzip-two-members"),
    ],
)
async def test_coded_response_is_decoded_and_sent_as_identity(encoding: str, encode: Any) -> None:
    """Issue 16 item 8: a gzip response passed unchanged, password included."""
    policy = construct(POLICY, {"response": {"remove": ["user.password"]}})
    action = await resolve(
        policy.on_response(coded_response_ctx(encode(json.dumps(SECRET).encode()), encoding))
    )
    assert isinstance(action, ResponseModifications)
    assert action.body is not None
    assert json.loads(action.body) == {"user": {"name": "dana"}, "id": 7}
    assert action.remove_headers == ("content-encoding",)


def test_coded_response_needing_no_change_passes_still_coded() -> None:
    policy = construct(POLICY, {"response": {"remove": ["user.password"]}})
    ctx = coded_response_ctx(gzipped(b'{"id": 7}'), "gzip")
    assert policy.on_response(ctx) is None


@pytest.mark.parametrize(
    ("encoding", "body", "message"),
    [
        pytest.param("br", b"\x1b\x00", "content-encoding 'br' is not supported", id="br"),
        pytest.param("zstd", b"(\xb5/\xfd", "'zstd' is not supported", id="zstd"),
        pytest.param("gzip", b"not gzip at all", "not valid gzip", id="not-gzip"),
        pytest.param(
            "gzip", gzipped(json.dumps(SECRET).encode())[:-12], "truncated", id="truncated"
        ),
        pytest.param("gzip", gzipped(b"{}") + b"junk", "not valid gzip", id="trailing-garbage"),
        pytest.param(
            "deflate", zlib.compress(b"{}") + b"{}", "after the end", id="deflate-trailing"
        ),
        pytest.param(
            "gzip, gzip, gzip", gzipped(gzipped(gzipped(b"{}"))), "stacked", id="three-codings"
        ),
    ],
)
async def test_unreadable_coding_fails_the_response_and_refuses_the_request(
    encoding: str, body: bytes, message: str
) -> None:
    policy = construct(
        POLICY,
        {"request": {"remove": ["user.password"]}, "response": {"remove": ["user.password"]}},
    )
    with pytest.raises(PolicyError, match=message):
        await resolve(policy.on_response(coded_response_ctx(body, encoding)))
    request = make_request_context(headers={"content-encoding": encoding}, method="POST", body=body)
    action = await resolve(policy.on_request(request))
    assert isinstance(action, ImmediateResponse)
    assert action.status == (415 if "supported" in message or "stacked" in message else 400)
    assert message in json.loads(action.body)["message"]


async def test_zip_bomb_stops_at_max_body_bytes() -> None:
    bomb = gzipped(b'{"a": "' + b"0" * (50 << 20) + b'"}')  # 50 MiB in ~50 KB
    assert len(bomb) < 100_000
    policy = construct(
        POLICY,
        {"request": {"remove": ["a"]}, "response": {"remove": ["a"]}, "maxBodyBytes": 1 << 20},
    )
    started = time.perf_counter()
    with pytest.raises(PolicyError, match="larger than 1048576 bytes once decoded"):
        await resolve(policy.on_response(coded_response_ctx(bomb, "gzip")))
    request = make_request_context(headers={"content-encoding": "gzip"}, method="POST", body=bomb)
    action = await resolve(policy.on_request(request))
    assert isinstance(action, ImmediateResponse)
    assert action.status == 413
    assert time.perf_counter() - started < 2.0  # stopped at 1 MiB, never inflated 50 MiB


async def test_large_decoding_runs_in_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past INLINE_DECODE_BYTES the hook returns an awaitable that decodes off the loop."""
    module = sys.modules[type(construct(POLICY, {"response": {"set": {"a": 1}}})).__module__]
    threads: list[str] = []
    real = module._decode

    def spy(body: bytes, codings: tuple[str, ...], limit: int) -> bytes:
        threads.append(threading.current_thread().name)
        decoded: bytes = real(body, codings, limit)
        return decoded

    monkeypatch.setattr(module, "_decode", spy)
    document = {"user": {"password": "s"}, "pad": "x" * (200 * 1024)}
    policy = construct(POLICY, {"response": {"remove": ["user.password"]}})
    action = policy.on_response(coded_response_ctx(gzipped(json.dumps(document).encode()), "gzip"))
    assert inspect.isawaitable(action)
    result = await action
    assert json.loads(result.body) == {"user": {}, "pad": document["pad"]}
    assert threads[0] == threading.current_thread().name  # the inline attempt (64 KiB)
    assert threads[1] != threading.current_thread().name  # the rest in a worker thread
    small = policy.on_response(coded_response_ctx(gzipped(json.dumps(SECRET).encode()), "gzip"))
    assert isinstance(small, ResponseModifications)  # small bodies stay inline


async def test_coded_request_is_decoded_and_forwarded_as_identity() -> None:
    policy = construct(POLICY, {"request": {"remove": ["user.password"]}})
    request = make_request_context(
        headers={"content-encoding": "gzip"},
        method="POST",
        body=gzipped(json.dumps(SECRET).encode()),
    )
    action = await resolve(policy.on_request(request))
    assert isinstance(action, RequestModifications)
    assert action.body is not None
    assert json.loads(action.body) == {"user": {"name": "dana"}, "id": 7}
    assert action.remove_headers == ("content-encoding",)


@pytest.mark.parametrize("phase", ["request", "response"])
def test_a_utf8_bom_is_stripped_and_the_body_transformed(phase: str) -> None:
    """Issue 16 item 8: a BOM made the body "not JSON"; a response passed unchanged, and
    browsers (fetch().json()) strip the BOM and read the password."""
    body = b"\xef\xbb\xbf" + json.dumps(SECRET).encode()
    policy = construct(POLICY, {phase: {"remove": ["user.password"]}})
    hook = policy.on_request if phase == "request" else policy.on_response
    action = hook(request_ctx(body) if phase == "request" else response_ctx(body))
    assert action is not None
    assert action.body is not None
    assert not action.body.startswith(b"\xef\xbb\xbf")
    assert json.loads(action.body) == {"user": {"name": "dana"}, "id": 7}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            b'{"user": {"password": "s3cret"}, "user": "x"}', {"user": "x"}, id="nested-first"
        ),
        pytest.param(
            b'{"user": {"password": "a", "password": "b", "name": "n"}}',
            {"user": {"name": "n"}},
            id="inner-duplicates",
        ),
        pytest.param(
            b'{"user": {"profile": {"password": "s"}, "profile": 1}}',
            {"user": {"profile": 1}},
            id="deeper",
        ),
    ],
)
@pytest.mark.parametrize("phase", ["request", "response"])
def test_duplicate_names_collapse_to_what_the_policy_read(
    phase: str, body: bytes, expected: Any
) -> None:
    """Issue 16 item 9: with the last duplicate read, removing user.password was a
    no-op and the ORIGINAL bytes went on: a first-duplicate parser read the password."""
    policy = construct(POLICY, {phase: {"remove": ["user.password", "user.profile.password"]}})
    hook = policy.on_request if phase == "request" else policy.on_response
    action = hook(request_ctx(body) if phase == "request" else response_ctx(body))
    assert action is not None
    assert action.body is not None
    assert b"password" not in action.body
    assert json.loads(action.body) == expected
    assert action.body.count(b'"user"') == 1


def test_response_routes_ask_the_upstream_for_identity() -> None:
    policy = construct(POLICY, {"request": {"set": {"a": 1}}, "response": {"remove": ["x"]}})
    assert policy.phases() == ("request", "response")
    assert policy.bodies() == ("request", "response")
    request = make_request_context(
        headers={"accept-encoding": "gzip, br", "content-type": "application/json"},
        method="POST",
        body=b"{}",
    )
    action = policy.on_request(request)
    assert isinstance(action, RequestModifications)
    assert action.set_headers == {"accept-encoding": "identity"}
    assert action.body is not None
    assert json.loads(action.body) == {"a": 1}
    response_only = construct(POLICY, {"response": {"remove": ["x"]}})
    assert response_only.phases() == ("request", "response")
    assert response_only.bodies() == ("response",)  # request bodies are never buffered
    request_only = construct(POLICY, {"request": {"remove": ["x"]}})
    assert (request_only.phases(), request_only.bodies()) == (("request",), ("request",))
    assert request_only.on_request(request_ctx(None)) is None
