"""Test cases every jwtValidation version passes, written once.

The policy code of each version stays a frozen copy in its own folder; its tests
need not be. A version's test module star-imports this module (``__all__``: every
fixture and case) and defines a ``policy`` fixture, its
:class:`~engine.registry.RegisteredPolicy`. pytest collects imported test functions
as the module's own, so each case runs once per version under the version's own
ids (``test_jwtValidation_v1_0_0.py::test_rejected_tokens[expired]``)::

    from policies.jwtValidation.common_cases import *  # noqa: F403

    POLICY = load_policy(Path(__file__).resolve().parents[1])

    @pytest.fixture(scope="module")
    def policy() -> RegisteredPolicy:
        return POLICY

A case added here therefore runs for every version; cases that hold only for some
versions belong in those versions' test modules.

The JWKS server is real HTTPS on 127.0.0.1 with a throw-away CA that only the
policy's ``caFile`` trusts; refresh pacing runs on a :class:`~engine.testing.FakeClock`,
so no test sleeps. Test-only code: nothing here is imported by a policy.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from engine.policy import ImmediateResponse, ParameterError, RequestContext
from engine.registry import RegisteredPolicy
from engine.testing import FakeClock, construct, make_request_context
from policies.jwtValidation.testing import (
    AUDIENCE,
    ISSUER,
    REJECTED_TOKENS,
    JwksServer,
    KeySet,
    Pki,
    SigningKey,
    claims,
    forge,
    make_pki,
    now,
)

__all__ = [
    "BASE",
    "assert_invalid_token",
    "clock",
    "ctx",
    "keys",
    "make",
    "no_verification",
    "pki",
    "server",
    "test_broken_jwks_fails_closed_then_recovers",
    "test_cache_holds_its_bounds_under_a_flood",
    "test_cached_token_is_refused_once_its_times_fail",
    "test_cached_token_skips_verification_and_keeps_its_claims",
    "test_cancelled_request_does_not_cancel_the_fetch",
    "test_clock_skew",
    "test_concurrent_requests_share_one_fetch_without_blocking_the_loop",
    "test_custom_header_and_case_insensitive_prefix",
    "test_entry_verified_under_replaced_keys_is_not_kept",
    "test_expired_keys_keep_working_during_outage",
    "test_failed_and_oversized_tokens_are_not_cached",
    "test_https_redirect_is_followed_and_http_refused",
    "test_instances_never_share_verdicts",
    "test_instances_share_one_tls_context_per_ca_file",
    "test_key_removed_at_ttl_refresh_invalidates_cached_tokens",
    "test_key_rotation_is_picked_up",
    "test_keys_are_cached",
    "test_keys_with_other_use_are_ignored",
    "test_missing_token_is_401_without_error_code",
    "test_outage_keeps_cached_keys_and_fails_closed_for_new_ones",
    "test_refetch_of_the_same_keys_keeps_cached_tokens",
    "test_rejected_tokens",
    "test_schema_rejections",
    "test_timed_out_waiter_leaves_the_fetch_running",
    "test_trickling_server_cannot_hold_the_fetch_past_fetch_timeout",
    "test_ttl_refresh_serves_cached_keys_while_it_runs",
    "test_unknown_kid_refresh_is_rate_limited",
    "test_unreadable_ca_file_is_a_parameter_error",
    "test_untrusted_certificate_is_refused",
    "test_valid_token_passes_and_fills_metadata",
]

BASE = {"jwksUrl": "https://idp.test/jwks", "issuer": ISSUER, "audiences": [AUDIENCE]}
"""The smallest valid parameters (no network is touched until a token arrives)."""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return KeySet.generate()


@pytest.fixture
def server(pki: Pki, keys: KeySet) -> Iterator[JwksServer]:
    with JwksServer(pki, keys.published) as jwks:
        yield jwks


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(500.0)


@pytest.fixture
async def make(
    policy: RegisteredPolicy, server: JwksServer, pki: Pki, clock: FakeClock
) -> AsyncIterator[Callable[..., Any]]:
    """Build ``policy`` for ``server`` (overrides go into the parameters; ``None``
    drops one; ``options`` are constructor keywords besides ``clock``, e.g. a
    ``wall_clock``). Every instance built is closed (its HTTP client) after the test."""
    built: list[Any] = []

    def build(*, options: dict[str, Any] | None = None, **overrides: Any) -> Any:
        params = {
            "jwksUrl": server.url,
            "issuer": ISSUER,
            "audiences": [AUDIENCE, "other-audience"],
            "algorithms": ["RS256", "ES256", "PS256"],
            "caFile": str(pki.ca_file),
            "minRefreshInterval": "30s",
            "fetchTimeout": "2s",
            **overrides,
        }
        params = {k: v for k, v in params.items() if v is not None}
        instance = construct(policy, params, clock=clock, **(options or {}))
        built.append(instance)
        return instance

    yield build
    for instance in built:
        await instance.aclose()


# --------------------------------------------------------------------------- helpers


def ctx(
    token: str | None, header: str = "authorization", prefix: str = "Bearer "
) -> RequestContext:
    """A request carrying ``token`` in ``header`` after ``prefix`` (no header if ``None``)."""
    headers = {} if token is None else {header: prefix + token}
    return make_request_context(headers=headers)


def assert_invalid_token(action: object, description: str) -> None:
    """``action`` is the RFC 6750 401 ``invalid_token`` naming ``description``."""
    assert isinstance(action, ImmediateResponse)
    assert action.status == 401
    challenge = action.headers["www-authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="')
    assert description in challenge
    assert json.loads(action.body)["error"] == "invalid_token"


# --------------------------------------------------------------------------- definition


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param(
            {**BASE, "jwksUrl": "http://idp.test/jwks"}, "jwksUrl must be HTTPS", id="http-url"
        ),
        pytest.param({**BASE, "jwksUrl": "idp.test/jwks"}, "jwksUrl must be HTTPS", id="not-a-url"),
        pytest.param(
            {}, "missing required parameter(s): audiences, issuer, jwksUrl", id="missing-required"
        ),
        pytest.param(
            {**BASE, "audiences": []}, "audiences: [] should be non-empty", id="no-audience"
        ),
        pytest.param(
            {**BASE, "algorithms": ["HS256"]},
            "algorithms[0]: 'HS256' is not one of",
            id="hmac-algorithm",
        ),
        pytest.param(
            {**BASE, "header": "bad header"},
            "header: 'bad header' does not match",
            id="header-pattern-mismatch",
        ),
        pytest.param(
            {**BASE, "clockSkew": "-1s"},
            "clockSkew: '-1s' is not a 'duration'",
            id="negative-duration",
        ),
    ],
)
def test_schema_rejections(policy: RegisteredPolicy, params: dict[str, Any], expected: str) -> None:
    _, errors = policy.definition.validate_parameters(params)
    assert any(expected in error for error in errors), errors


def test_unreadable_ca_file_is_a_parameter_error(policy: RegisteredPolicy, tmp_path: Path) -> None:
    with pytest.raises(ParameterError) as info:
        construct(policy, {**BASE, "caFile": str(tmp_path / "missing.pem")})
    assert info.value.field == "caFile"


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("key_name", ["rsa", "ec"], ids=["rs256", "es256"])
async def test_valid_token_passes_and_fills_metadata(
    make: Callable[..., Any], keys: KeySet, key_name: str
) -> None:
    key: SigningKey = getattr(keys, key_name)
    request = ctx(key.sign(claims(sub="user-7")))
    assert await make().on_request(request) is None
    assert request.metadata["jwt.sub"] == "user-7"
    assert request.metadata["jwt.claims"]["email"] == "alice@example.com"
    assert request.metadata["jwt.claims"]["aud"] == AUDIENCE


@pytest.mark.parametrize(
    ("make_token", "description"),
    [pytest.param(f, d, id=i) for i, f, d in REJECTED_TOKENS],
)
async def test_rejected_tokens(
    make: Callable[..., Any], keys: KeySet, make_token: Callable[[KeySet], str], description: str
) -> None:
    request = ctx(make_token(keys))
    assert_invalid_token(await make().on_request(request), description)
    assert request.metadata == {}


@pytest.mark.parametrize(
    "request_ctx",
    [
        pytest.param(ctx(None), id="no-header"),
        pytest.param(ctx("abc", prefix="Basic "), id="other-scheme"),
        pytest.param(ctx("", prefix="Bearer "), id="empty-token"),
    ],
)
async def test_missing_token_is_401_without_error_code(
    make: Callable[..., Any], request_ctx: RequestContext
) -> None:
    action = await make().on_request(request_ctx)
    assert isinstance(action, ImmediateResponse)
    assert action.status == 401
    assert action.headers["www-authenticate"] == "Bearer"


async def test_custom_header_and_case_insensitive_prefix(
    make: Callable[..., Any], keys: KeySet
) -> None:
    policy = make(header="X-Id-Token", prefix="JWT ")
    assert await policy.on_request(ctx(keys.rsa.sign(claims()), "x-id-token", "jwt ")) is None
    empty_prefix = make(prefix="")
    assert await empty_prefix.on_request(ctx(keys.rsa.sign(claims()), prefix="")) is None


@pytest.mark.parametrize(
    ("skew", "offset", "accepted"),
    [
        pytest.param("30s", -10, True, id="expired-within-skew"),
        pytest.param("0s", -10, False, id="expired-no-skew"),
        pytest.param("2m", -100, True, id="minutes-skew"),
    ],
)
async def test_clock_skew(
    make: Callable[..., Any], keys: KeySet, skew: str, offset: int, accepted: bool
) -> None:
    token = keys.rsa.sign(claims(exp=now() + offset))
    action = await make(clockSkew=skew).on_request(ctx(token))
    assert (action is None) is accepted


# --------------------------------------------------------------------------- JWKS cache


async def test_keys_are_cached(make: Callable[..., Any], keys: KeySet, server: JwksServer) -> None:
    policy = make()
    for _ in range(3):
        assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    assert await policy.on_request(ctx(keys.ec.sign(claims()))) is None
    assert server.hits == 1


async def test_key_rotation_is_picked_up(
    make: Callable[..., Any], keys: KeySet, server: JwksServer, clock: FakeClock
) -> None:
    policy = make()
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    server.keys = [keys.rotated.jwk]  # IdP rotates: new key published, old one withdrawn
    clock.advance(31)  # past minRefreshInterval (and, from v2 on, well within the TTL)
    assert await policy.on_request(ctx(keys.rotated.sign(claims()))) is None
    assert server.hits == 2
    # The refresh replaced the key set: the withdrawn key no longer verifies.
    assert_invalid_token(await policy.on_request(ctx(keys.rsa.sign(claims()))), "no usable key")


async def test_unknown_kid_refresh_is_rate_limited(
    make: Callable[..., Any], keys: KeySet, server: JwksServer, clock: FakeClock
) -> None:
    policy = make(minRefreshInterval="30s")
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    assert server.hits == 1
    server.keys = [*keys.published, keys.rotated.jwk]
    unknown = keys.rotated.sign(claims())
    clock.advance(10)
    for _ in range(5):  # a flood of unknown kids inside the interval fetches nothing
        assert_invalid_token(await policy.on_request(ctx(unknown)), "no usable key")
    assert server.hits == 1
    clock.advance(20)  # 30 s after the last fetch
    assert await policy.on_request(ctx(unknown)) is None
    assert server.hits == 2
    bogus = SigningKey("never-published", "RS256", keys.rsa.private_key).sign(claims())
    assert_invalid_token(await policy.on_request(ctx(bogus)), "no usable key")
    assert server.hits == 2


async def test_outage_keeps_cached_keys_and_fails_closed_for_new_ones(
    make: Callable[..., Any], keys: KeySet, server: JwksServer, clock: FakeClock
) -> None:
    policy = make()
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    server.stop()
    clock.advance(60)
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    assert await policy.on_request(ctx(keys.ec.sign(claims()))) is None
    assert_invalid_token(await policy.on_request(ctx(keys.rotated.sign(claims()))), "no usable")


@pytest.mark.parametrize(
    "served",
    [
        pytest.param((503, None, False), id="http-503"),
        pytest.param((200, b"<html>not json</html>", False), id="not-json"),
        pytest.param((200, b'{"no": "keys"}', False), id="no-keys-list"),
        pytest.param((200, b" " * (1 << 20) + b"{}", False), id="oversized"),
        pytest.param((200, b" " * (1 << 20) + b"{}", True), id="oversized-without-length"),
    ],
)
async def test_broken_jwks_fails_closed_then_recovers(  # noqa: PLR0917 - fixtures
    make: Callable[..., Any],
    keys: KeySet,
    server: JwksServer,
    clock: FakeClock,
    served: tuple[int, bytes | None, bool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.status, server.body, server.unframed = served
    policy = make()
    assert_invalid_token(await policy.on_request(ctx(keys.rsa.sign(claims()))), "no usable key")
    if served[2]:  # the cap applied while reading, not from a stated length
        assert "JWKS larger than 1048576 bytes" in caplog.text
    server.status, server.body, server.unframed = 200, None, False
    clock.advance(30)
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None


async def test_untrusted_certificate_is_refused(
    make: Callable[..., Any], keys: KeySet, server: JwksServer
) -> None:
    policy = make(caFile=None)  # system trust store: the test CA is not in it
    assert_invalid_token(await policy.on_request(ctx(keys.rsa.sign(claims()))), "no usable key")
    assert server.hits == 0  # the TLS handshake failed before any HTTP request


async def test_keys_with_other_use_are_ignored(
    make: Callable[..., Any], keys: KeySet, server: JwksServer
) -> None:
    server.keys = [{**keys.rsa.jwk, "use": "enc"}]
    assert_invalid_token(await make().on_request(ctx(keys.rsa.sign(claims()))), "no usable key")


async def test_concurrent_requests_share_one_fetch_without_blocking_the_loop(
    make: Callable[..., Any], keys: KeySet, server: JwksServer
) -> None:
    server.delay = 0.3
    policy = make()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(
            *(policy.on_request(ctx(keys.rsa.sign(claims()))) for _ in range(10))
        )
    finally:
        tick_task.cancel()
    assert results == [None] * 10
    assert server.hits == 1
    assert ticks >= 10  # the loop kept running while the fetch waited 0.3 s


# --------------------------------------------------------------------------- fail safe (issue 8)


def random_kid_token(keys: KeySet) -> str:
    """What an attacker sends to force a JWKS fetch: a kid the IdP never published."""
    return SigningKey(f"random-{now()}", "RS256", keys.rotated.private_key).sign(claims())


async def wait_for_hits(server: JwksServer, hits: int) -> None:
    """Wait (off the loop) until the server has counted ``hits`` requests (bounded)."""
    await asyncio.to_thread(server.wait_for_hits, hits)


async def test_cancelled_request_does_not_cancel_the_fetch(
    make: Callable[..., Any], keys: KeySet, server: JwksServer
) -> None:
    """Issue 8 item 6: a client that hangs up (or any cancellation of the request
    that started the fetch) must not throw the keys away for minRefreshInterval."""
    policy = make(minRefreshInterval="30s")
    server.hold()
    attacker = asyncio.create_task(policy.on_request(ctx(random_kid_token(keys))))
    await wait_for_hits(server, 1)  # the fetch is in flight
    attacker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attacker
    server.release()
    # Same instant (the fake clock did not move): a valid token must still pass.
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    assert server.hits == 1


async def test_timed_out_waiter_leaves_the_fetch_running(
    make: Callable[..., Any], keys: KeySet, server: JwksServer
) -> None:
    """The per-policy timeout cuts a waiting request short the same way."""
    policy = make()
    server.hold()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await policy.on_request(ctx(keys.rsa.sign(claims())))
    server.release()
    await policy.jwks.settle()
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    assert server.hits == 1


async def test_ttl_refresh_serves_cached_keys_while_it_runs(
    make: Callable[..., Any], keys: KeySet, server: JwksServer, clock: FakeClock
) -> None:
    """Issue 8 item 7: after jwksCacheTtl a request with a known kid does not wait
    for the refetch (stale-while-revalidate); the refetch then drops withdrawn keys."""
    policy = make(jwksCacheTtl="2m", minRefreshInterval="10s")
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    clock.advance(119)
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    assert server.hits == 1  # still fresh
    server.keys = [keys.ec.jwk]  # rsa-1 withdrawn by the IdP
    server.hold()
    clock.advance(1)
    for _ in range(3):  # all answered from the cache while the refetch is held
        assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    await wait_for_hits(server, 2)
    server.release()
    await policy.jwks.settle()
    assert server.hits == 2  # one refetch for all of them
    assert_invalid_token(await policy.on_request(ctx(keys.rsa.sign(claims()))), "no usable key")
    assert await policy.on_request(ctx(keys.ec.sign(claims()))) is None
    assert server.hits == 2


async def test_expired_keys_keep_working_during_outage(
    make: Callable[..., Any], keys: KeySet, server: JwksServer, clock: FakeClock
) -> None:
    policy = make(jwksCacheTtl="1m", minRefreshInterval="10s")
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    server.status = 500
    clock.advance(61)
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None  # starts a refetch
    await policy.jwks.settle()
    assert server.hits == 2  # ... which failed
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None  # paced: no refetch
    await policy.jwks.settle()
    assert server.hits == 2
    clock.advance(10)
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    await policy.jwks.settle()
    assert server.hits == 3


async def test_trickling_server_cannot_hold_the_fetch_past_fetch_timeout(
    make: Callable[..., Any], keys: KeySet, server: JwksServer
) -> None:
    """fetchTimeout bounds the whole fetch, not each socket read: a server sending
    one byte every 20 ms (minutes for a JWKS) gives up after fetchTimeout."""
    server.trickle = 0.02
    policy = make(fetchTimeout="300ms")
    async with asyncio.timeout(10):  # the old per-read timeout would take minutes
        action = await policy.on_request(ctx(keys.rsa.sign(claims())))
    assert_invalid_token(action, "no usable key")


async def test_https_redirect_is_followed_and_http_refused(
    make: Callable[..., Any], keys: KeySet, server: JwksServer, clock: FakeClock
) -> None:
    server.redirect = server.moved_url
    policy = make()
    assert await policy.on_request(ctx(keys.rsa.sign(claims()))) is None
    assert server.hits == 2
    assert server.connections == 1  # the redirect hop reused the connection
    server.redirect = server.moved_url.replace("https://", "http://")
    downgraded = make()
    assert_invalid_token(await downgraded.on_request(ctx(keys.rsa.sign(claims()))), "no usable")
    assert server.hits == 3  # the http:// location was never fetched


def test_instances_share_one_tls_context_per_ca_file(
    policy: RegisteredPolicy, pki: Pki, tmp_path: Path
) -> None:
    """Building a TLS context costs ~20-30 ms: a config with hundreds of JWT routes
    must not build one per instance."""

    def context(ca_file: Path | None) -> object:
        params = {**BASE, "caFile": None if ca_file is None else str(ca_file)}
        params = {k: v for k, v in params.items() if v is not None}
        return construct(policy, params).jwks.context

    assert context(pki.ca_file) is context(pki.ca_file)
    assert context(None) is context(None)
    assert context(None) is not context(pki.ca_file)
    copied = tmp_path / "ca.pem"
    copied.write_bytes(pki.ca_file.read_bytes())
    first = context(copied)
    copied.write_bytes(pki.ca_file.read_bytes() + b"\n")  # a rotated CA file is read again
    assert context(copied) is not first


# --------------------------------------------------------------------------- verified-token cache


@pytest.fixture
def no_verification(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call to make any later token parsing or signature check fail the test: what
    is accepted after that came from the verified-token cache."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("token verified again")

    def arm() -> None:
        monkeypatch.setattr(jwt, "decode", refuse)
        monkeypatch.setattr(jwt, "get_unverified_header", refuse)

    return arm


async def test_cached_token_skips_verification_and_keeps_its_claims(
    make: Callable[..., Any], keys: KeySet, no_verification: Callable[[], None]
) -> None:
    policy = make()
    token = keys.rsa.sign(claims(sub="user-7", roles=["a", "b"]))
    first = ctx(token)
    assert await policy.on_request(first) is None
    no_verification()
    second = ctx(token)
    assert await policy.on_request(second) is None
    assert second.metadata["jwt.sub"] == "user-7"
    assert second.metadata["jwt.claims"] == first.metadata["jwt.claims"]
    # Each request gets its own claims: one cannot change what another sees.
    assert second.metadata["jwt.claims"]["roles"] is not first.metadata["jwt.claims"]["roles"]
    assert policy.token_cache.hits == 1


@pytest.mark.parametrize(
    ("move", "accepted", "description"),
    [
        pytest.param(60 + 29, True, "", id="exp-within-skew"),
        pytest.param(60 + 30, False, "token expired", id="exp-past-skew"),
        pytest.param(-31, False, "token not yet valid", id="wall-clock-stepped-back"),
    ],
)
async def test_cached_token_is_refused_once_its_times_fail(  # noqa: PLR0917 - fixtures
    make: Callable[..., Any],
    keys: KeySet,
    no_verification: Callable[[], None],
    move: int,
    accepted: bool,
    description: str,
) -> None:
    """exp, nbf and iat are checked on every request with clockSkew (30s), cached or not."""
    t = now()
    wall = FakeClock(time.time())
    policy = make(clockSkew="30s", options={"wall_clock": wall})
    token = keys.rsa.sign(claims(iat=t, nbf=t, exp=t + 60))
    assert await policy.on_request(ctx(token)) is None
    no_verification()
    wall.advance(t - wall.now + move)  # to exactly t + move
    action = await policy.on_request(ctx(token))
    if accepted:
        assert action is None
    else:
        assert_invalid_token(action, description)
        assert len(policy.token_cache) == 0  # dropped, not kept refusing


async def test_key_removed_at_ttl_refresh_invalidates_cached_tokens(
    make: Callable[..., Any], keys: KeySet, server: JwksServer, clock: FakeClock
) -> None:
    """Only cache hits arrive: they must still start the TTL refresh, and a key set
    without the signing key must end the cached verdicts it gave."""
    policy = make(jwksCacheTtl="2m", minRefreshInterval="10s")
    token = keys.rsa.sign(claims())
    for _ in range(3):
        assert await policy.on_request(ctx(token)) is None
    assert policy.token_cache.hits == 2
    server.keys = [keys.ec.jwk]  # rsa-1 withdrawn
    clock.advance(120)
    assert await policy.on_request(ctx(token)) is None  # stale-while-revalidate
    await policy.jwks.settle()
    assert server.hits == 2  # the cache hit started the refresh
    assert_invalid_token(await policy.on_request(ctx(token)), "no usable key")
    assert_invalid_token(await policy.on_request(ctx(token)), "no usable key")


async def test_refetch_of_the_same_keys_keeps_cached_tokens(
    make: Callable[..., Any],
    keys: KeySet,
    server: JwksServer,
    clock: FakeClock,
    no_verification: Callable[[], None],
) -> None:
    policy = make(jwksCacheTtl="2m", minRefreshInterval="10s")
    token = keys.rsa.sign(claims())
    assert await policy.on_request(ctx(token)) is None
    generation = policy.jwks.generation
    clock.advance(120)
    no_verification()
    assert await policy.on_request(ctx(token)) is None
    await policy.jwks.settle()
    assert server.hits == 2
    assert policy.jwks.generation == generation
    assert await policy.on_request(ctx(token)) is None


async def test_instances_never_share_verdicts(
    make: Callable[..., Any], keys: KeySet, server: JwksServer
) -> None:
    """Each instance has its own cache: a token one route accepted (and cached) is
    judged afresh under another route's issuer and audiences."""
    token = keys.rsa.sign(claims())
    accepting = make()
    for _ in range(2):
        assert await accepting.on_request(ctx(token)) is None
    assert accepting.token_cache.hits == 1
    other_audience = make(audiences=["billing-api"])
    assert_invalid_token(await other_audience.on_request(ctx(token)), "audience not accepted")
    other_issuer = make(issuer="https://other-idp.test/")
    assert_invalid_token(await other_issuer.on_request(ctx(token)), "issuer not accepted")
    assert len(other_audience.token_cache) == len(other_issuer.token_cache) == 0


@pytest.mark.parametrize(
    ("max_tokens", "max_bytes"),
    [pytest.param(8, 1 << 20, id="entries"), pytest.param(1000, 3000, id="bytes")],
)
async def test_cache_holds_its_bounds_under_a_flood(
    make: Callable[..., Any],
    keys: KeySet,
    no_verification: Callable[[], None],
    max_tokens: int,
    max_bytes: int,
) -> None:
    """Distinct valid tokens (the only kind that enters) past either bound: the
    least recently used go, the bound holds, the newest still hit."""
    options = {"max_cached_tokens": max_tokens, "max_cached_bytes": max_bytes}
    policy = make(options=options)
    tokens = [keys.ec.sign(claims(sub=f"user-{i}")) for i in range(40)]
    for token in tokens:
        assert await policy.on_request(ctx(token)) is None
        assert len(policy.token_cache) <= max_tokens
        assert policy.token_cache.size_bytes <= max_bytes
    assert 2 <= len(policy.token_cache) < len(tokens)
    kept = len(policy.token_cache)
    no_verification()
    for token in tokens[-kept:]:
        assert await policy.on_request(ctx(token)) is None
    with pytest.raises(AssertionError, match="token verified again"):
        await policy.on_request(ctx(tokens[0]))  # evicted: verified again


async def test_failed_and_oversized_tokens_are_not_cached(
    make: Callable[..., Any], keys: KeySet
) -> None:
    """A junk flood leaves the cache as it was; a token over 8 KiB is verified every
    time, never kept."""
    policy = make()
    valid = keys.rsa.sign(claims())
    assert await policy.on_request(ctx(valid)) is None
    # The cached token's header and claims with other signature bytes: not a hit.
    resigned = valid[:-4] + ("AAAA" if not valid.endswith("AAAA") else "BBBB")
    assert_invalid_token(await policy.on_request(ctx(resigned)), "signature verification failed")
    for index in range(50):
        junk = forge({"alg": "RS256", "kid": keys.rsa.kid}, claims(sub=f"x{index}"), b"sig")
        assert_invalid_token(await policy.on_request(ctx(junk)), "signature verification failed")
    for _, make_token, description in REJECTED_TOKENS:
        assert_invalid_token(await policy.on_request(ctx(make_token(keys))), description)
    assert len(policy.token_cache) == 1
    huge = keys.rsa.sign(claims(padding="x" * 9000))
    for _ in range(2):
        assert await policy.on_request(ctx(huge)) is None
    assert len(policy.token_cache) == 1
    assert policy.token_cache.hits == 0


def test_entry_verified_under_replaced_keys_is_not_kept(make: Callable[..., Any]) -> None:
    """A verification that finished after the cache saw a newer key set (no await
    separates them today: a guard for the future) is not kept."""
    cache = make().token_cache
    verified = sys.modules[type(cache).__module__].Verified
    assert cache.get(b"k" * 32, 2) is None  # the cache has seen generation 2
    cache.put(b"k" * 32, verified(b"{}", 1, now() + 60, None), 100)
    assert len(cache) == 0
    cache.put(b"k" * 32, verified(b"{}", 2, now() + 60, None), 100)
    assert cache.get(b"k" * 32, 2) is not None
    assert cache.get(b"k" * 32, 3) is None  # a newer key set empties it
    assert len(cache) == 0
