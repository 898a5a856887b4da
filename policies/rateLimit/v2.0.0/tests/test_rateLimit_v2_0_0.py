"""Tests of rateLimit v2.0.0 without Redis: validation, GCRA, headers, keying, local bounds.

The Redis backend against a real redis-server: test_redis_backend.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.errors import PolicyError
from engine.policy import ImmediateResponse, ParameterError, RequestContext
from engine.registry import load_policy
from engine.streaming_testing import stream_body
from engine.testing import (
    FakeClock,
    construct,
    example_id,
    make_request_context,
    make_response_context,
    valid_examples,
)

FOLDER = Path(__file__).resolve().parents[1]
POLICY = load_policy(FOLDER)
GCRA = __import__(f"{POLICY.factory.__module__.rpartition('.')[0]}.gcra", fromlist=["decide"])


def make(params: Mapping[str, Any], clock: FakeClock | None = None) -> Any:
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
    ("params", "field", "message"),
    [
        pytest.param({"keyBy": "header"}, "keyName", "must be set", id="header-no-name"),
        pytest.param({"keyName": "x-a"}, "keyName", "only applies", id="name-with-client-ip"),
        pytest.param(
            {"keyBy": "header", "keyName": "x a"}, "keyName", "valid header", id="bad-header"
        ),
        pytest.param({"scope": "x"}, "scope", "only applies when backend", id="scope-local"),
        pytest.param(
            {"onBackendError": "allow"}, "onBackendError", "only applies", id="fallback-local"
        ),
        pytest.param(
            {"backend": "redis", "redisUrl": "redis://h", "redisUrlEnv": "X"},
            "redisUrl",
            "exactly one of",
            id="url-and-env",
        ),
        pytest.param(
            {"backend": "redis", "redisUrlEnv": "NOT A NAME"},
            "redisUrlEnv",
            "not an environment variable name",
            id="bad-env-name",
        ),
        pytest.param(
            {"backend": "redis", "redisUrl": "redis://:6379"}, "redisUrl", "no host", id="no-host"
        ),
        pytest.param(
            {"backend": "redis", "redisUrl": "redis://h:0"}, "redisUrl", "1-65535", id="port-0"
        ),
        pytest.param(
            {"backend": "redis", "redisUrl": "redis://h:70000"},
            "redisUrl",
            "not a valid URL",
            id="port-too-big",
        ),
        pytest.param(
            {"backend": "redis", "redisUrl": "redis://h/0?timeout=1"},
            "redisUrl",
            "query",
            id="query",
        ),
        pytest.param(
            {"backend": "redis", "redisUrl": "redis://h", "backendTimeout": "0ms"},
            "backendTimeout",
            "greater than 0",
            id="zero-timeout",
        ),
        pytest.param(
            {"backend": "redis", "redisUrl": "redis://h", "scope": "a b"},
            "scope",
            "letters",
            id="bad-scope",
        ),
    ],
)
def test_parameter_errors(params: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ParameterError) as info:
        make({"requestsPerSecond": 1, **params})
    assert info.value.field == field
    assert message in info.value.message


def test_password_never_in_errors() -> None:
    with pytest.raises(ParameterError) as info:
        make({"requestsPerSecond": 1, "backend": "redis", "redisUrl": "redis://u:hunter2@h/x"})
    assert "hunter2" not in str(info.value)
    assert "u:<redacted>@h" in info.value.message


def test_redis_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    params = {"requestsPerSecond": 1, "backend": "redis", "redisUrlEnv": "RL_TEST_REDIS_URL"}
    monkeypatch.setenv("RL_TEST_REDIS_URL", "rediss://u:pw@cache.internal:6380/3")
    assert make(params)._redis.url == "rediss://u:pw@cache.internal:6380/3"
    monkeypatch.setenv("RL_TEST_REDIS_URL", "redis://u:pw@cache.internal:x")
    with pytest.raises(ParameterError) as info:
        make(params)
    assert "(from environment variable RL_TEST_REDIS_URL)" in info.value.message
    assert "pw" not in info.value.message.replace("<redacted>", "")


def test_config_errors_through_the_loader() -> None:
    from engine.config import load_config
    from engine.errors import ConfigError
    from engine.registry import PolicyRegistry

    document = {
        "routes": {
            "api": {
                "policies": [
                    {
                        "name": "rateLimit",
                        "version": "v2.0.0",
                        "parameters": {
                            "requestsPerSecond": 5,
                            "backend": "redis",
                            "redisUrl": "memcached://h",
                        },
                    }
                ]
            }
        }
    }
    with pytest.raises(ConfigError) as info:
        load_config(document, source="test", registry=PolicyRegistry([POLICY]))
    assert info.value.errors == (
        "routes[api].policies[0] rateLimit v2.0.0: "
        "redisUrl: 'memcached://h': scheme must be redis:// or rediss://",
    )


# -------------------------------------------------------------------------- GCRA


def test_burst_then_refill_at_rate() -> None:
    clock = FakeClock()
    policy = make({"requestsPerSecond": 2, "burstSize": 3}, clock)
    assert [allowed(policy, ctx()) for _ in range(4)] == [True, True, True, False]
    clock.advance(0.49)
    assert not allowed(policy, ctx())
    clock.advance(0.01)  # 0.5 s at 2/s = one request
    assert allowed(policy, ctx())
    assert not allowed(policy, ctx())
    clock.advance(100)  # refill is capped at the burst size
    assert [allowed(policy, ctx()) for _ in range(4)] == [True, True, True, False]


def test_denied_requests_do_not_push_the_client_further_back() -> None:
    clock = FakeClock()
    policy = make({"requestsPerSecond": 1, "burstSize": 1}, clock)
    assert allowed(policy, ctx())
    for _ in range(50):
        assert not allowed(policy, ctx())
    clock.advance(1.0)
    assert allowed(policy, ctx())


@pytest.mark.parametrize(
    ("tat", "now", "expected"),
    [
        pytest.param(0, 100, (True, 2, 0, 50, 150), id="unknown-client-full"),
        pytest.param(150, 100, (True, 1, 0, 100, 200), id="second"),
        pytest.param(200, 100, (True, 0, 0, 150, 250), id="last"),
        pytest.param(250, 100, (False, 0, 50, 150, None), id="denied"),
        pytest.param(250, 150, (True, 0, 0, 150, 300), id="one-interval-later"),
    ],
)
def test_gcra_decide(tat: int, now: int, expected: tuple[Any, ...]) -> None:
    decision, new_tat = GCRA.decide(tat, now, 50, 3)
    allowed_, remaining, retry, reset, stored = expected
    assert (decision.allowed, decision.remaining, decision.retry_after_us) == (
        allowed_,
        remaining,
        retry,
    )
    assert (decision.reset_us, new_tat) == (reset, stored)


# -------------------------------------------------------------------------- headers


def test_429_carries_the_standard_headers() -> None:
    clock = FakeClock()
    policy = make({"requestsPerSecond": 0.5, "burstSize": 2}, clock)
    assert allowed(policy, ctx())
    assert allowed(policy, ctx())
    clock.advance(0.5)
    action = policy.on_request(ctx())
    assert isinstance(action, ImmediateResponse)
    assert action.status == 429
    assert action.headers == {
        "ratelimit-limit": "2",
        "ratelimit-remaining": "0",
        "ratelimit-reset": "4",  # full again 4 s from now (2 requests x 2 s, 0.5 s passed)
        "retry-after": "2",  # one request in 1.5 s, rounded up
        "content-type": "application/json",
    }
    assert json.loads(action.body) == {
        "error": "too_many_requests",
        "message": "rate limit exceeded",
        "retryAfterSeconds": 2,
    }


def test_allowed_requests_get_the_headers_on_the_response() -> None:
    policy = make({"requestsPerSecond": 1, "burstSize": 3})
    remaining = []
    for _ in range(3):
        request = ctx()
        assert policy.on_request(request) is None
        assert request.metadata["rateLimit.decision"] == "allowed"
        action = policy.on_response(make_response_context(request))
        remaining.append(action.set_headers["ratelimit-remaining"])
        assert action.set_headers["ratelimit-limit"] == "3"
    assert remaining == ["2", "1", "0"]
    denied = ctx()
    policy.on_request(denied)
    assert denied.metadata["rateLimit.decision"] == "limited"


def test_no_headers_without_a_decision() -> None:
    policy = make({"requestsPerSecond": 1})
    assert policy.on_response(make_response_context()) is None


# -------------------------------------------------------------------------- keying


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


def test_header_and_metadata_identifiers() -> None:
    by_header = make({"requestsPerSecond": 1, "burstSize": 1, "keyBy": "header", "keyName": "X-T"})
    assert allowed(by_header, ctx(headers={"x-t": "a"}))
    assert not allowed(by_header, ctx(client="10.9.9.9", headers={"x-t": "a"}))
    assert allowed(by_header, ctx(headers={"x-t": "b"}))
    by_user = make({"requestsPerSecond": 1, "burstSize": 1, "keyBy": "metadata", "keyName": "u"})
    assert allowed(by_user, ctx(metadata={"u": "alice"}))
    assert allowed(by_user, ctx(metadata={"u": "bob"}))
    assert not allowed(by_user, ctx(metadata={"u": "alice"}))


# -------------------------------------------------------------------------- local bounds


def test_local_memory_is_bounded() -> None:
    clock = FakeClock()
    policy = make({"requestsPerSecond": 1, "burstSize": 1, "maxKeys": 50}, clock)
    for i in range(1000):
        policy.on_request(ctx(client=f"10.0.{i // 256}.{i % 256}"))
        clock.advance(0.01)
    assert policy.bucket_count == 50
    buckets = policy._local
    assert len(buckets._heap) <= 2 * 50 + 64


def test_eviction_never_gives_a_limited_client_a_fresh_bucket() -> None:
    """maxKeys clients all still refilling: a new client must not push one out (v1 did,
    handing the evicted client a full bucket); it is limited in the overflow bucket."""
    clock = FakeClock()
    policy = make({"requestsPerSecond": 0.1, "burstSize": 1, "maxKeys": 2}, clock)
    assert allowed(policy, ctx(client="10.0.0.1"))
    assert allowed(policy, ctx(client="10.0.0.2"))
    # Two new clients: the table is full of refilling clients, so they share the overflow.
    assert allowed(policy, ctx(client="10.0.0.3"))
    assert not allowed(policy, ctx(client="10.0.0.4"))
    # The limited clients are still limited (not evicted, not reset).
    assert not allowed(policy, ctx(client="10.0.0.1"))
    assert not allowed(policy, ctx(client="10.0.0.2"))
    assert policy.bucket_count == 2
    clock.advance(10.0)  # every bucket is full again: entries may now be replaced
    assert allowed(policy, ctx(client="10.0.0.5"))
    assert allowed(policy, ctx(client="10.0.0.1"))
    assert policy.bucket_count == 2


def test_refilled_entries_make_room_without_changing_decisions() -> None:
    clock = FakeClock()
    policy = make({"requestsPerSecond": 1, "burstSize": 2, "maxKeys": 3}, clock)
    for client in ("a", "b", "c"):
        assert allowed(policy, ctx(client=client))
    clock.advance(0.5)
    assert allowed(policy, ctx(client="a"))  # a: remaining 0, TAT = now + 1.5 s
    clock.advance(0.6)  # b and c are full again, a is not
    assert allowed(policy, ctx(client="d"))  # takes a refilled slot
    again = ctx(client="a")
    assert allowed(policy, again)  # 1.1 s refilled one request...
    assert again.metadata["rateLimit.remaining"] == 0  # ...but a kept its state: not a fresh 1
    assert policy.bucket_count == 2


# ------------------------------------------------------------- cost after the response


def test_gcra_cost_zero_checks_and_charge_overspends() -> None:
    # Cost 0: nothing stored, allowed while the bucket is not overspent.
    decision, stored = GCRA.decide(0, 100, 50, 3, 0)
    assert (decision.allowed, stored) == (True, None)
    # Charging 10 units into a bucket of 3: never denied, the bucket goes negative.
    decision, stored = GCRA.decide(0, 100, 50, 3, 10, charge=True)
    assert (decision.allowed, decision.remaining, stored) == (True, 0, 600)
    # The next check is denied until the TAT is back within the burst.
    decision, _ = GCRA.decide(600, 100, 50, 3, 0)
    assert (decision.allowed, decision.retry_after_us) == (False, 350)
    assert GCRA.decide(600, 450, 50, 3, 0)[0].allowed


async def test_usage_charged_at_the_end_of_the_response_limits_the_next_request() -> None:
    clock = FakeClock()
    params = {
        "requestsPerSecond": 100,  # 100 tokens refill per second
        "burstSize": 1000,
        "keyBy": "metadata",
        "keyName": "consumer",
        "costMetadataKey": "llmUsage.totalTokens",
    }
    policy = make(params, clock)
    assert policy.bodies() == ("response",)
    assert make({"requestsPerSecond": 1}).bodies() == ()
    request = ctx(metadata={"consumer": "alice"})
    assert allowed(policy, request)  # only checked: nothing taken yet
    response = make_response_context(request)
    response.metadata["llmUsage.totalTokens"] = 1500  # more than the whole burst
    out = await stream_body(policy, response, [b"data: tokens\n\n", b""])
    assert out.body == b"data: tokens\n\n"  # passed on unchanged
    limited = policy.on_request(ctx(metadata={"consumer": "alice"}))
    assert isinstance(limited, ImmediateResponse)
    assert limited.status == 429
    assert limited.headers["retry-after"] == "5"  # 500 tokens over: 5 s at 100/s
    assert allowed(policy, ctx(metadata={"consumer": "bob"}))  # per consumer
    clock.advance(5)
    assert allowed(policy, ctx(metadata={"consumer": "alice"}))


async def test_buffered_response_is_charged_in_on_response() -> None:
    clock = FakeClock()
    params = {"requestsPerSecond": 1, "burstSize": 5, "costMetadataKey": "cost"}
    policy = make(params, clock)
    request = ctx()
    assert allowed(policy, request)
    response = make_response_context(request, body=b"{}")
    response.metadata["cost"] = 9
    action = await policy.on_response(response)
    assert action is not None  # the RateLimit headers
    assert not allowed(policy, ctx())
    # No cost written, or a nonsense one: nothing charged.
    other = make(params, clock)
    for value in (None, -3, "9", True):
        response = make_response_context(ctx(), body=b"{}")
        assert allowed(other, response.request)
        if value is not None:
            response.metadata["cost"] = value
        await other.on_response(response)
    assert allowed(other, ctx())


def test_explain_says_when_the_cost_comes_from_metadata() -> None:
    def explain(params: Mapping[str, Any]) -> Any:
        # As the engine calls it: with the validated parameters, defaults filled in.
        normalised, errors = POLICY.definition.validate_parameters(params)
        assert errors == []
        policy_class: Any = POLICY.factory
        return policy_class.explain(normalised)

    plain = explain({"requestsPerSecond": 10})
    assert "cost" not in plain
    costed = explain({"requestsPerSecond": 10, "costMetadataKey": "llmUsage.totalTokens"})
    assert "llmUsage.totalTokens" in costed["cost"]
    assert "end of the response" in costed["cost"]
