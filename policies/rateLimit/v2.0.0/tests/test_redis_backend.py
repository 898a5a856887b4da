"""rateLimit v2.0.0's redis backend against a real redis-server on a free 127.0.0.1 port.

Several policy instances on one event loop stand for the routes of one worker; the
multi-process cases (two engines, two workers) are in tests/e2e/test_rate_limit_redis.py.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.policy import ImmediateResponse, RequestContext
from engine.registry import load_policy
from engine.streaming import Chunk
from engine.testing import construct, make_request_context, make_response_context
from policies.rateLimit.testing import RedisServer, delaying_proxy, redis_server

__all__ = ["redis_server"]  # the fixture, imported so pytest finds it

FOLDER = Path(__file__).resolve().parents[1]
POLICY = load_policy(FOLDER)
BACKEND = __import__(
    f"{POLICY.factory.__module__.rpartition('.')[0]}.redis_backend", fromlist=["RETRY_INTERVAL"]
)


@pytest.fixture(autouse=True)
async def close_shared_clients() -> AsyncIterator[None]:
    """Each test's loop gets its own clients; close them so no socket outlives the test."""
    yield
    await BACKEND.aclose_clients()


def make(server: RedisServer, **params: Any) -> Any:
    # A generous timeout unless a test is about timeouts: a loaded CI machine may need
    # more than 50 ms for the first call (connect, NOSCRIPT, SCRIPT LOAD, EVALSHA).
    base = {
        "requestsPerSecond": 1,
        "burstSize": 3,
        "backend": "redis",
        "redisUrl": server.url,
        "backendTimeout": "3s",
    }
    return construct(POLICY, {**base, **params})


def ctx(user: str = "alice", route: str = "api") -> RequestContext:
    return make_request_context(headers={"x-user": user}, route=route, client_address="10.0.0.1")


async def decide(policy: Any, request: RequestContext) -> ImmediateResponse | None:
    # Bounded: a hung decision fails the test instead of hanging it.
    result = policy.on_request(request)
    return await asyncio.wait_for(result, 10) if asyncio.iscoroutine(result) else result


async def test_burst_then_429_with_headers_then_refill(redis_server: RedisServer) -> None:
    policy = make(redis_server, keyBy="header", keyName="x-user")
    started = time.monotonic()
    remaining = []
    for _ in range(3):
        request = ctx()
        assert await decide(policy, request) is None
        remaining.append(request.metadata["rateLimit.remaining"])
    denied = await decide(policy, ctx())
    assert time.monotonic() - started < 1.0, "too slow to test a 1/s refill exactly"
    assert remaining == [2, 1, 0]
    assert isinstance(denied, ImmediateResponse)
    assert denied.status == 429
    assert denied.headers["ratelimit-limit"] == "3"
    assert denied.headers["ratelimit-remaining"] == "0"
    assert denied.headers["retry-after"] == "1"
    assert denied.headers["ratelimit-reset"] == "3"  # ceil(<3 s): full again within 3 s
    assert await decide(policy, ctx(user="bob")) is None  # another key still passes
    await asyncio.sleep(1.05)
    assert await decide(policy, ctx()) is None  # one request refilled
    assert isinstance(await decide(policy, ctx()), ImmediateResponse)


async def test_cost_charged_after_the_response_is_shared(redis_server: RedisServer) -> None:
    # Two instances on one Redis stand for two engines: a cost one of them charges
    # after a response limits the client's next request on the other.
    params = {
        "keyBy": "header",
        "keyName": "x-user",
        "requestsPerSecond": 10,
        "burstSize": 20,
        "costMetadataKey": "llmUsage.totalTokens",
        "scope": "llm",
    }
    first, second = make(redis_server, **params), make(redis_server, **params)
    request = ctx()
    assert await decide(first, request) is None  # a check only: nothing stored
    assert redis_server.command("KEYS", "*") == []
    response = make_response_context(request)
    response.metadata["llmUsage.totalTokens"] = 50  # 30 units over the burst of 20
    await asyncio.wait_for(first.on_response_chunk(response, Chunk(b"", True)), 10)
    denied = await decide(second, ctx())
    assert isinstance(denied, ImmediateResponse)
    assert denied.status == 429
    assert denied.headers["retry-after"] == "3"  # 30 units at 10 per second
    assert await decide(second, ctx(user="bob")) is None
    keys = redis_server.command("KEYS", "*")
    assert isinstance(keys, list)
    ttl = redis_server.command("PTTL", str(keys[0]))
    assert isinstance(ttl, int)
    assert 4000 < ttl <= 5000  # the key lives until the bucket is full again (50 / 10 s)


async def test_keys_have_the_prefix_a_ttl_and_no_clear_identifier(
    redis_server: RedisServer,
) -> None:
    policy = make(redis_server, keyBy="header", keyName="x-user", keyPrefix="t:rl:")
    await decide(policy, ctx(user="alice@example.test"))
    keys = redis_server.command("KEYS", "*")
    assert isinstance(keys, list)
    assert len(keys) == 1
    key = str(keys[0])
    assert key.startswith("t:rl:api:")
    assert "alice" not in key
    ttl = redis_server.command("PTTL", key)
    assert isinstance(ttl, int)
    assert 0 < ttl <= 1000


async def test_instances_share_state_by_scope(redis_server: RedisServer) -> None:
    """Routes get their own limits by default; a shared scope makes them one limit."""
    a, b = (make(redis_server, burstSize=1, keyBy="header", keyName="x-user") for _ in "ab")
    assert await decide(a, ctx(route="one")) is None
    assert await decide(b, ctx(route="two")) is None  # other route: its own bucket
    shared = [
        make(redis_server, burstSize=1, keyBy="header", keyName="x-user", scope="s") for _ in "ab"
    ]
    assert await decide(shared[0], ctx(route="one")) is None
    assert isinstance(await decide(shared[1], ctx(route="two")), ImmediateResponse)
    # Same scope, other limit: never mixed with the first limit's state.
    other = make(redis_server, burstSize=2, keyBy="header", keyName="x-user", scope="s")
    assert await decide(other, ctx()) is None
    # Every instance of this loop used ONE client (one pool) for the URL.
    assert len(BACKEND._SHARED[asyncio.get_running_loop()]) == 1


@pytest.mark.parametrize(
    ("fallback", "status", "decision"),
    [
        pytest.param("allow", None, "backendErrorAllowed", id="allow"),
        pytest.param("deny", 503, "backendErrorDenied", id="deny"),
    ],
)
async def test_redis_down_then_back(
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    fallback: str,
    status: int | None,
    decision: str,
) -> None:
    caplog.set_level(logging.INFO, logger="policies.rateLimit.redis")
    policy = make(redis_server, burstSize=2, onBackendError=fallback)
    assert await decide(policy, ctx()) is None
    redis_server.stop()
    for _ in range(20):
        request = ctx()
        action = await decide(policy, request)
        assert (action.status if action else None) == status
        assert request.metadata["rateLimit.decision"] == decision
        assert "rateLimit.remaining" not in request.metadata  # no numbers, no headers
    down = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(down) == 1
    assert down[0].levelno == logging.WARNING
    redis_server.start()  # empty: the restarted Redis lost the script and the keys
    await asyncio.sleep(BACKEND.RETRY_INTERVAL + 0.1)
    results = [await decide(policy, ctx()) for _ in range(3)]
    assert results[:2] == [None, None]
    assert isinstance(results[2], ImmediateResponse)
    assert results[2].status == 429
    up = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(up) == 1
    assert up[0].levelno == logging.INFO


async def test_slow_redis_is_bounded_by_the_timeout(redis_server: RedisServer) -> None:
    # Warm the worker's shared client (connection, script) with a patient instance.
    assert await decide(make(redis_server, keyBy="header", keyName="x-user"), ctx("w")) is None
    policy = make(redis_server, onBackendError="allow", backendTimeout="50ms")
    sleeper = threading.Thread(target=redis_server.command, args=("DEBUG", "SLEEP", "1.5"))
    sleeper.start()
    try:
        await asyncio.sleep(0.1)  # Redis is now blocked for ~1.4 s
        started = time.monotonic()
        request = ctx()
        assert await decide(policy, request) is None
        waited = time.monotonic() - started
        assert request.metadata["rateLimit.decision"] == "backendErrorAllowed"
        # The decision did not wait for Redis (blocked ~1.4 s more): the timeout cut it.
        assert waited < 1.0, waited
        # This instance is marked slow: its next requests do not even try (no second wait).
        started = time.monotonic()
        assert await decide(policy, ctx()) is None
        assert time.monotonic() - started < 0.05
    finally:
        sleeper.join(5)


async def test_one_routes_short_timeout_does_not_switch_other_routes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis answers every command ~40 ms late. Route "fast" allows 5 ms: its decisions time
    # out. Route "patient" allows 5 s: it must keep asking Redis. Before, the first
    # timeout marked the worker's Redis down and "patient" answered onBackendError (503)
    # without asking.
    caplog.set_level(logging.INFO, logger="policies.rateLimit.redis")
    async with delaying_proxy(redis_server.port, 0.04) as url:
        patient = make(redis_server, redisUrl=url, backendTimeout="5s")
        fast = make(redis_server, redisUrl=url, backendTimeout="5ms")
        assert await decide(patient, ctx(route="patient")) is None  # warm: connect, script
        for _ in range(2):
            request = ctx(route="fast")
            action = await decide(fast, request)
            assert action is not None
            assert action.status == 503
            assert request.metadata["rateLimit.decision"] == "backendErrorDenied"
            request = ctx(route="patient")
            started = time.monotonic()
            assert await decide(patient, request) is None
            assert request.metadata["rateLimit.decision"] == "allowed"
            assert time.monotonic() - started >= 0.04  # Redis was asked, through the delay
        assert BACKEND.is_up(url) is True
    slow = [r for r in caplog.records if "did not answer within backendTimeout" in r.getMessage()]
    assert len(slow) == 1  # one line per transition of the fast route, not per request
    assert not [r for r in caplog.records if "unavailable" in r.getMessage()]


async def test_ten_thousand_keys_stay_bounded(redis_server: RedisServer) -> None:
    """Redis keeps only refilling clients (keys expire); the engine keeps nothing per key."""
    # A generous timeout: this test is about memory, not about a loaded machine's latency.
    policy = make(
        redis_server,
        requestsPerSecond=20,
        burstSize=1,
        keyBy="header",
        keyName="x-user",
        backendTimeout="5s",
    )

    async def run(offset: int, count: int) -> None:
        batch = 200
        for start in range(offset, offset + count, batch):
            await asyncio.gather(
                *(decide(policy, ctx(f"u{i}")) for i in range(start, start + batch))
            )

    async def all_expired() -> None:
        deadline = time.monotonic() + 10
        while redis_server.command("DBSIZE") != 0:
            assert time.monotonic() < deadline, "keys did not expire"
            await asyncio.sleep(0.1)

    await run(0, 2_000)  # warm up: connections, caches (Redis's client buffers, its key table)
    await all_expired()
    baseline = int(redis_server.info("memory")["used_memory"])
    tracemalloc.start()
    try:
        await run(2_000, 2_000)  # what stays allocated after one run (the loop's own state)...
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        await run(4_000, 10_000)  # ...does not grow with 10,000 more distinct keys
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert BACKEND.is_up(redis_server.url) is True
    # A per-key leak of even 10 bytes would show as 100 kB.
    assert grown < 50_000, grown
    keyspace = redis_server.info("keyspace").get("db0", "keys=0,expires=0")
    fields = dict(part.split("=") for part in keyspace.split(","))
    assert fields["keys"] == fields["expires"]  # every key has a TTL
    await all_expired()  # every key gone once its bucket refilled (50 ms here)
    # 12,000 more keys came and went: Redis holds what it held before (a leak of
    # 12,000 keys would be over 1 MB).
    assert int(redis_server.info("memory")["used_memory"]) < baseline + 300_000


async def test_config_load_creates_no_connection(redis_server: RedisServer) -> None:
    """Constructing the policy (config load, before workers fork) never connects."""
    make(redis_server)
    clients = redis_server.command("CLIENT", "LIST")
    assert isinstance(clients, str)
    assert len(clients.strip().splitlines()) == 1  # only our own CLIENT LIST connection


def _mapping(params: Mapping[str, Any]) -> dict[str, Any]:
    return dict(params)
