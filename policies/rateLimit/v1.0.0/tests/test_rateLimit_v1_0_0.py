"""Tests of rateLimit v1.0.0: validation, token bucket, identifiers, eviction."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.errors import PolicyError
from engine.policy import ImmediateResponse, ParameterError, RequestContext
from engine.registry import load_policy
from engine.testing import (
    FakeClock,
    construct,
    example_id,
    make_request_context,
    valid_examples,
)

FOLDER = Path(__file__).resolve().parents[1]
POLICY = load_policy(FOLDER)
BUCKET_BYTES = 600
"""The memory bound per bucket that the definition states (policy.BUCKET_BYTES)."""


def make(params: Mapping[str, Any], clock: FakeClock | None = None) -> Any:
    """The policy for ``params``, on ``clock`` (a fresh fake clock by default)."""
    return construct(POLICY, params, clock=clock or FakeClock(1000.0))


def ctx(
    client: str = "10.0.0.1:5555",
    headers: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> RequestContext:
    return make_request_context(headers=headers, metadata=metadata, client_address=client)


def allowed(policy: Any, request: RequestContext) -> bool:
    action = policy.on_request(request)
    assert action is None or (isinstance(action, ImmediateResponse) and action.status == 429)
    return action is None


def test_definition_examples_behave_as_declared() -> None:
    assert POLICY.check_examples() == []


@pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
def test_valid_examples_construct(example: Mapping[str, Any]) -> None:
    make(example["parameters"])


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param(
            {"requestsPerSecond": -1},
            "requestsPerSecond: -1 is less than or equal to the minimum of 0",
            id="negative-rate",
        ),
        pytest.param(
            {"requestsPerSecond": "10"},
            "requestsPerSecond: '10' is not of type",
            id="rate-not-a-number",
        ),
        pytest.param(
            {"requestsPerSecond": 1, "burstSize": 1.5},
            "burstSize: 1.5 is not of type 'integer'",
            id="fractional-burst",
        ),
        pytest.param(
            {"requestsPerSecond": 1, "maxKeys": 0},
            "maxKeys: 0 is less than the minimum",
            id="zero-max-keys",
        ),
        pytest.param({}, "missing required parameter(s): requestsPerSecond", id="missing-rate"),
    ],
)
def test_schema_rejections(params: dict[str, Any], expected: str) -> None:
    _, errors = POLICY.definition.validate_parameters(params)
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"keyBy": "header"}, "must be set when keyBy is header", id="header-no-name"),
        pytest.param(
            {"keyBy": "metadata"}, "must be set when keyBy is metadata", id="metadata-no-name"
        ),
        pytest.param({"keyName": "x-a"}, "only applies when keyBy is", id="name-with-client-ip"),
        pytest.param(
            {"keyBy": "header", "keyName": "x a"}, "not a valid header name", id="bad-header-name"
        ),
        pytest.param(
            {"keyBy": "header", "keyName": "x-a\n"},
            "not a valid header name",
            id="header-name-trailing-newline",
        ),
    ],
)
def test_parameter_errors(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ParameterError) as info:
        make({"requestsPerSecond": 1, **params})
    assert info.value.field == "keyName"
    assert message in info.value.message


def test_burst_then_refill_at_rate() -> None:
    clock = FakeClock()
    policy = make({"requestsPerSecond": 2, "burstSize": 3}, clock)
    assert [allowed(policy, ctx()) for _ in range(4)] == [True, True, True, False]
    clock.advance(0.49)
    assert not allowed(policy, ctx())
    clock.advance(0.01)  # 0.5 s at 2/s = one token
    assert allowed(policy, ctx())
    assert not allowed(policy, ctx())
    clock.advance(100)  # refill is capped at the burst size
    assert [allowed(policy, ctx()) for _ in range(4)] == [True, True, True, False]


def test_burst_defaults_to_rate_rounded_up() -> None:
    policy = make({"requestsPerSecond": 2.5})
    assert [allowed(policy, ctx()) for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize(
    ("rate", "advance", "retry_after"),
    [
        pytest.param(1, 0.0, "1", id="one-per-second"),
        pytest.param(0.5, 0.0, "2", id="slower-than-one-per-second"),
        pytest.param(0.1, 2.5, "8", id="partly-refilled-rounds-up"),
        pytest.param(100, 0.0, "1", id="sub-second-wait-is-one"),
    ],
)
def test_429_with_retry_after(rate: float, advance: float, retry_after: str) -> None:
    clock = FakeClock()
    policy = make({"requestsPerSecond": rate, "burstSize": 1}, clock)
    assert allowed(policy, ctx())
    clock.advance(advance)
    action = policy.on_request(ctx())
    assert isinstance(action, ImmediateResponse)
    assert action.status == 429
    assert action.headers["retry-after"] == retry_after
    assert action.headers["content-type"] == "application/json"
    assert json.loads(action.body)["retryAfterSeconds"] == int(retry_after)


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        pytest.param("10.0.0.1:1000", "10.0.0.1:2000", True, id="same-ip-other-port"),
        pytest.param("10.0.0.1:1000", "10.0.0.2:1000", False, id="other-ip"),
        pytest.param("[::1]:80", "0:0::1", True, id="ipv6-normalised"),
    ],
)
def test_client_ip_identifier(first: str, second: str, shared: bool) -> None:
    policy = make({"requestsPerSecond": 1, "burstSize": 1})
    assert allowed(policy, ctx(client=first))
    assert allowed(policy, ctx(client=second)) is not shared


def test_client_ip_without_envoys_address_fails_naming_the_attribute() -> None:
    # No source.address attribute: before, every such request shared one bucket keyed on
    # nothing, and the engine filled the address from a client-written x-forwarded-for.
    policy = make({"requestsPerSecond": 1, "burstSize": 1})
    request = ctx(client="", headers={"x-forwarded-for": "6.6.6.6"})
    with pytest.raises(PolicyError, match=r"add source\.address to the ext_proc filter's"):
        policy.on_request(request)


def test_header_identifier() -> None:
    policy = make(
        {"requestsPerSecond": 1, "burstSize": 1, "keyBy": "header", "keyName": "X-Tenant"}
    )
    assert allowed(policy, ctx(headers={"x-tenant": "a"}))
    assert not allowed(policy, ctx(client="10.9.9.9:1", headers={"x-tenant": "a"}))
    assert allowed(policy, ctx(headers={"x-tenant": "b"}))
    assert allowed(policy, ctx(headers={}))  # anonymous bucket
    assert not allowed(policy, ctx(headers={"x-tenant": ""}))  # empty counts as missing


def test_metadata_identifier_per_user() -> None:
    """User story 7: the rate limit reads the user id an earlier policy stored."""
    policy = make(
        {"requestsPerSecond": 1, "burstSize": 2, "keyBy": "metadata", "keyName": "jwt.sub"}
    )
    alice = [allowed(policy, ctx(metadata={"jwt.sub": "alice"})) for _ in range(3)]
    bob = [allowed(policy, ctx(metadata={"jwt.sub": "bob"})) for _ in range(3)]
    assert alice == [True, True, False]
    assert bob == [True, True, False]
    assert allowed(policy, ctx(metadata={"jwt.sub": 42}))  # non-string values are keys too


def test_eviction_only_takes_refilled_buckets() -> None:
    clock = FakeClock()
    policy = make({"requestsPerSecond": 1, "burstSize": 1, "maxKeys": 2}, clock)
    assert allowed(policy, ctx(client="10.0.0.1"))
    assert allowed(policy, ctx(client="10.0.0.2"))
    # Table full of empty buckets: nobody is evicted, newcomers share the overflow.
    assert allowed(policy, ctx(client="10.0.0.3"))
    assert not allowed(policy, ctx(client="10.0.0.4"))
    assert not allowed(policy, ctx(client="10.0.0.2"))  # .2 did not start over
    assert policy.bucket_count == 2
    clock.advance(1.0)  # every bucket has refilled: the least recently used goes
    assert allowed(policy, ctx(client="10.0.0.4"))
    assert policy.bucket_count == 2
    assert allowed(policy, ctx(client="10.0.0.2"))  # refilled on its own
    assert not allowed(policy, ctx(client="10.0.0.4"))  # .4 kept its own bucket


def test_cycling_more_clients_than_max_keys_gets_no_extra_tokens() -> None:
    """Issue 8 item 8: with maxKeys=100, 101 clients cycling got zero 429s (each
    eviction handed the next client a fresh full bucket)."""
    policy = make({"requestsPerSecond": 1, "burstSize": 1, "maxKeys": 100})
    clients = [f"10.0.1.{i}" for i in range(101)]
    results = [allowed(policy, ctx(client=c)) for _ in range(5) for c in clients]
    # One token each for the 100 kept clients and one for the shared overflow bucket.
    assert results.count(True) == 101
    assert results.count(False) == 4 * 101


def test_long_keys_are_hashed_and_memory_is_bounded() -> None:
    """Issue 8 item 8: 2,000 requests with 60 KB key values held 115 MiB."""
    import tracemalloc

    policy = make({"requestsPerSecond": 1, "keyBy": "header", "keyName": "x-key"})
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            request = ctx(headers={"x-key": f"{i:06d}" + "x" * 60_000})
            assert allowed(policy, request)
            del request
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert policy.bucket_count == 2000
    assert held < 2000 * BUCKET_BYTES, f"{held} bytes held"


def test_long_keys_keep_separate_buckets() -> None:
    policy = make({"requestsPerSecond": 1, "burstSize": 1, "keyBy": "header", "keyName": "x-k"})
    long_a, long_b = "a" * 100, "a" * 99 + "b"
    assert allowed(policy, ctx(headers={"x-k": long_a}))
    assert not allowed(policy, ctx(headers={"x-k": long_a}))
    assert allowed(policy, ctx(headers={"x-k": long_b}))
    digest = hashlib.sha256(long_a.encode()).hexdigest()
    assert allowed(policy, ctx(headers={"x-k": digest}))  # a digest's text is its own key


def test_memory_bound_is_stated() -> None:
    text = " ".join(POLICY.definition.description.split())
    assert f"at most {BUCKET_BYTES} bytes each" in text
    assert "SHA-256" in text


def test_many_clients_stay_bounded() -> None:
    policy = make({"requestsPerSecond": 1, "maxKeys": 50})
    for i in range(1000):
        policy.on_request(ctx(client=f"10.0.{i // 256}.{i % 256}"))
    assert policy.bucket_count == 50


def test_per_worker_behaviour_is_documented() -> None:
    module = inspect.getmodule(POLICY.factory)
    assert module is not None
    assert module.__doc__ is not None
    for text in (POLICY.definition.description, " ".join(module.__doc__.split())):
        assert "per worker" in text
        assert "own buckets" in text


def test_config_errors_through_the_loader() -> None:
    """User story 8, scenario 2 (range error) and a constructor check, via the loader."""
    from engine.config import load_config
    from engine.errors import ConfigError
    from engine.registry import PolicyRegistry

    def entry(**params: Any) -> dict[str, Any]:
        return {"name": "rateLimit", "version": "v1.0.0", "parameters": params}

    document = {
        "routes": {
            "api": {"policies": [entry(requestsPerSecond=-5)]},
            "users": {"policies": [entry(requestsPerSecond=5, keyBy="metadata")]},
        }
    }
    registry = PolicyRegistry([POLICY])
    with pytest.raises(ConfigError) as info:
        load_config(document, source="test", registry=registry)
    assert info.value.errors == (
        "routes[api].policies[0] rateLimit v1.0.0: "
        "requestsPerSecond: -5 is less than or equal to the minimum of 0",
    )
    del document["routes"]["api"]
    with pytest.raises(ConfigError) as info:
        load_config(document, source="test", registry=registry)
    assert info.value.errors == (
        "routes[users].policies[0] rateLimit v1.0.0: keyName: must be set when keyBy is metadata",
    )
