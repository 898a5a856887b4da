"""rateLimit v2.0.0: rate limiting per client, in this worker or shared through Redis.

Contract:

* Keying is v1's: the client IP (``keyBy: clientIp``; the port is dropped), a request
  header or a metadata value (``keyBy: header|metadata`` + ``keyName``, e.g.
  ``jwt.sub``). Requests lacking a header or metadata identifier share one bucket; a
  ``clientIp`` decision without Envoy's ``source.address`` attribute raises
  :class:`~engine.errors.PolicyError` naming the attribute (``onError`` decides), as
  ``x-forwarded-for`` is never trusted.
* The algorithm is GCRA (``gcra.py``): the decisions of a token bucket of
  ``burstSize`` requests refilled at ``requestsPerSecond``, with one number of state
  per client.
* ``backend: local`` keeps the state in this worker process (like v1: with N
  workers a client may get N times the limit), at most ``maxKeys`` clients, never
  handing a client that is still refilling a fresh bucket (``gcra.LocalBuckets``).
* ``backend: redis`` keeps it in Redis (``redisUrl``, or the URL in the environment
  variable ``redisUrlEnv``), so every worker and every engine sharing that Redis
  enforces ONE limit per client. Keys are ``keyPrefix`` + scope + a hash of the
  identity, where scope is the route key (``scope`` to share a limit across routes).
  Each decision is bounded by ``backendTimeout`` (running out of it switches only
  this instance to ``onBackendError``, see ``redis_backend.py``); when Redis cannot decide,
  ``onBackendError`` says what happens: ``deny`` (the default: fail closed) answers
  503, ``allow`` lets the request through. See ``redis_backend.py``.
* Every decision carries the standard headers ``RateLimit-Limit`` (the burst),
  ``RateLimit-Remaining`` (requests left now) and ``RateLimit-Reset`` (seconds until
  the bucket is full again). A limited request is answered 429 with those headers,
  ``Retry-After`` (seconds until one request is allowed, at least 1) and a JSON body.
  An allowed request gets the headers on its response: the request phase stores the
  decision in ``ctx.metadata`` and the response phase writes them.
* Metadata written (for later policies, conditions and Envoy dynamic metadata):
  ``rateLimit.decision`` (``allowed`` | ``limited`` | ``backendErrorAllowed`` |
  ``backendErrorDenied``), ``rateLimit.limit``, ``rateLimit.remaining``,
  ``rateLimit.reset``. With two rateLimit v2 entries on one route, the last one that
  ran provides the headers.
* ``costMetadataKey`` (a cost known only after the response, e.g. ``llmUsage.totalTokens``
  for "tokens per minute per consumer"): the bucket then holds units, not requests
  (``requestsPerSecond`` units refill per second, ``burstSize`` at most). The request
  phase only checks that the client's bucket is not overspent (429 if it is) and takes
  nothing; at the end of the response the value of that metadata key (a non-negative
  int; absent: nothing) is charged, whatever the bucket holds, so a large answer makes
  the client's NEXT requests wait until the bucket has refilled. The response body then
  streams through the policy (a chunk hook that passes every piece on unchanged), so the
  charge happens after the policies before it in the chain (``llmUsage``) read the whole
  answer; a buffered response is charged in ``on_response``. With ``backend: redis`` the
  charge is shared by every engine using that Redis.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from engine import metrics
from engine.definition import parse_duration
from engine.errors import PolicyError
from engine.policy import (
    ImmediateResponse,
    ParameterError,
    RequestContext,
    ResponseContext,
    ResponseModifications,
)
from engine.secrets import redact_url

# Sibling modules. The engine loads this folder as a package, so they are relative
# imports at run time; mypy checks the folder as its base (a version folder is no
# package name), where they are top-level modules.
if TYPE_CHECKING:
    from gcra import MICROS, Decision, LocalBuckets, interval_us
    from redis_backend import BackendUnavailable, RedisBackend, check_redis_url

    from engine.streaming import Chunk
else:
    from .gcra import MICROS, Decision, LocalBuckets, interval_us
    from .redis_backend import BackendUnavailable, RedisBackend, check_redis_url

__all__ = ["DECISION_KEY", "NO_CLIENT_ADDRESS", "Policy", "client_ip"]

_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCOPE: Final = re.compile(r"[A-Za-z0-9_.:-]+")

NO_CLIENT_ADDRESS: Final = (
    "keyBy clientIp: Envoy sent no client address; add source.address to the ext_proc "
    "filter's request_attributes (x-forwarded-for is never trusted)"
)
"""The failure of a ``keyBy: clientIp`` decision without Envoy's ``source.address``."""

DECISION_KEY: Final = "rateLimit.decision"
_LIMIT_KEY: Final = "rateLimit.limit"
_REMAINING_KEY: Final = "rateLimit.remaining"
_RESET_KEY: Final = "rateLimit.reset"
_REDIS_ONLY: Final = (
    "redisUrl",
    "redisUrlEnv",
    "keyPrefix",
    "scope",
    "onBackendError",
    "backendTimeout",
)


def client_ip(address: str) -> str:
    """``"10.0.0.1:5123"`` -> ``"10.0.0.1"``, ``"[::1]:80"`` -> ``"::1"``; other text as is."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit():
        try:
            return str(ipaddress.ip_address(host.removeprefix("[").removesuffix("]")))
        except ValueError:
            pass
    return address


def _redis_url(params: Mapping[str, Any]) -> str:
    url, env = params.get("redisUrl"), params.get("redisUrlEnv")
    if (url is None) == (env is None):
        raise ParameterError("redisUrl", "backend redis needs exactly one of redisUrl, redisUrlEnv")
    field = "redisUrl"
    if env is not None:
        field = "redisUrlEnv"
        if _ENV_NAME.fullmatch(env) is None:
            raise ParameterError(field, f"{env!r} is not an environment variable name")
        url = os.environ.get(env)
        if not url:
            raise ParameterError(field, f"environment variable {env} is not set")
    problem = check_redis_url(str(url))
    if problem:
        where = f" (from environment variable {env})" if env is not None else ""
        raise ParameterError(field, problem + where)
    return str(url)


class Policy:
    """GCRA rate limiter; see the module docstring for the contract."""

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """The limit, what it is counted per, its backend (a Redis URL without its
        password), and what a limited request gets."""
        rate = params["requestsPerSecond"]
        key_by = str(params["keyBy"])
        backend = str(params["backend"])
        said: dict[str, Any] = {
            "limit": f"{rate:g} requests/s, burst {params.get('burstSize') or math.ceil(rate)}",
            "per": key_by if params.get("keyName") is None else f"{key_by} {params['keyName']}",
            "rejects": "429 over the limit",
            "backend": backend,
            "writesMetadata": [DECISION_KEY],
        }
        if params.get("costMetadataKey"):
            said["cost"] = (
                f"each request checks the bucket; the metadata {params['costMetadataKey']} "
                "is charged as units at the end of the response"
            )
        if backend == "redis":
            if params.get("redisUrl"):
                said["redis"] = redact_url(str(params["redisUrl"]))
            elif params.get("redisUrlEnv"):
                said["redis"] = f"the URL in ${params['redisUrlEnv']} on the engine host"
            said["onBackendError"] = params.get("onBackendError", "deny")
            said["backendTimeout"] = params.get("backendTimeout", "50ms")
        return said

    def __init__(
        self, params: Mapping[str, Any], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        rate = float(params["requestsPerSecond"])
        burst = params.get("burstSize")
        self._burst = int(burst if burst is not None else max(1, math.ceil(rate)))
        self._interval = interval_us(rate)
        self._key_by = str(params["keyBy"])
        key_name = params.get("keyName")
        if self._key_by == "clientIp":
            if key_name is not None:
                raise ParameterError("keyName", "only applies when keyBy is header or metadata")
            self._key_name = ""
        elif key_name is None:
            raise ParameterError("keyName", f"must be set when keyBy is {self._key_by}")
        elif self._key_by == "header":
            if _TOKEN.fullmatch(key_name) is None:
                raise ParameterError("keyName", f"{key_name!r} is not a valid header name")
            self._key_name = key_name.lower()
        else:
            self._key_name = key_name
        self._clock = clock
        self._cost_key: str | None = params.get("costMetadataKey")
        self._local: LocalBuckets | None = None
        self._redis: RedisBackend | None = None
        self._allow_on_error = params.get("onBackendError", "deny") == "allow"
        self._scope: str | None = params.get("scope")
        self._backend = str(params["backend"])
        if params["backend"] == "redis":
            if self._scope is not None and _SCOPE.fullmatch(self._scope) is None:
                raise ParameterError("scope", f"{self._scope!r}: use letters, digits, _ . : -")
            timeout = parse_duration(params.get("backendTimeout", "50ms"))
            if not 0 < timeout <= 10:
                raise ParameterError("backendTimeout", "must be greater than 0 and at most 10s")
            self._redis = RedisBackend(
                _redis_url(params),
                interval=self._interval,
                burst=self._burst,
                timeout=timeout,
                key_prefix=str(params.get("keyPrefix", "policy-engine:rl:")),
            )
            # Part of every key: entries with another identity or limit never share state.
            self._identity_prefix = (
                f"{self._key_by}:{self._key_name}:{self._interval}:{self._burst}"
            )
        else:
            for name in _REDIS_ONLY:
                if params.get(name) is not None:
                    raise ParameterError(name, "only applies when backend is redis")
            self._local = LocalBuckets(self._interval, self._burst, int(params["maxKeys"]))

    # -- request phase ---------------------------------------------------------------

    def _identifier(self, ctx: RequestContext) -> str | None:
        if self._key_by == "clientIp":
            if not ctx.client_address:
                raise PolicyError(NO_CLIENT_ADDRESS)
            value: object = client_ip(ctx.client_address)
        elif self._key_by == "header":
            value = ctx.headers.get(self._key_name)
        else:
            value = ctx.metadata.get(self._key_name)
        if value is None or value == "":
            return None
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)

    def on_request(
        self, ctx: RequestContext
    ) -> ImmediateResponse | Awaitable[ImmediateResponse | None] | None:
        """Decide; answer 429 (limited) or 503 (Redis unavailable, ``deny``), else continue.

        The local backend decides inline (a plain call, no coroutine on the hot path);
        the redis backend returns an awaitable, which the chain executor awaits."""
        identifier = self._identifier(ctx)
        cost = 0 if self._cost_key is not None else 1  # a later cost: only check now
        if self._local is None:
            return self._redis_request(ctx, identifier, cost)
        now = int(self._clock() * MICROS)
        return self._apply(ctx, self._local.take(identifier, now, cost))

    def _redis_key(self, ctx: RequestContext, identifier: str | None) -> str:
        assert self._redis is not None
        # A missing identifier is its own key ("-" never collides: real ones get "=").
        identity = f"{self._identity_prefix}:" + ("-" if identifier is None else "=" + identifier)
        scope = self._scope if self._scope is not None else ctx.route
        return self._redis.key(scope, identity)

    async def _redis_request(
        self, ctx: RequestContext, identifier: str | None, cost: int = 1
    ) -> ImmediateResponse | None:
        assert self._redis is not None
        try:
            decision = await self._redis.take(self._redis_key(ctx, identifier), cost)
        except BackendUnavailable:
            return self._backend_error(ctx)
        return self._apply(ctx, decision)

    def _apply(self, ctx: RequestContext, decision: Decision) -> ImmediateResponse | None:
        """Record ``decision`` in the metadata; the 429 when it denies."""
        metadata = ctx.metadata
        verdict = "allowed" if decision.allowed else "limited"
        metrics.ratelimit_decision(self._backend, verdict)
        metadata[DECISION_KEY] = verdict
        metadata[_LIMIT_KEY] = decision.limit
        metadata[_REMAINING_KEY] = decision.remaining
        metadata[_RESET_KEY] = decision.reset_seconds
        if decision.allowed:
            return None
        headers = _headers(decision)
        headers["retry-after"] = str(decision.retry_after_seconds)
        headers["content-type"] = "application/json"
        body = {
            "error": "too_many_requests",
            "message": "rate limit exceeded",
            "retryAfterSeconds": decision.retry_after_seconds,
        }
        return ImmediateResponse(status=429, headers=headers, body=json.dumps(body).encode())

    def _backend_error(self, ctx: RequestContext) -> ImmediateResponse | None:
        for key in (_LIMIT_KEY, _REMAINING_KEY, _RESET_KEY):
            ctx.metadata.pop(key, None)  # no numbers to report: no RateLimit headers
        if self._allow_on_error:
            ctx.metadata[DECISION_KEY] = "backendErrorAllowed"
            metrics.ratelimit_decision(self._backend, "backendErrorAllowed")
            return None
        ctx.metadata[DECISION_KEY] = "backendErrorDenied"
        metrics.ratelimit_decision(self._backend, "backendErrorDenied")
        body = {"error": "rate_limit_unavailable", "message": "rate limit backend unavailable"}
        return ImmediateResponse(
            status=503,
            headers={"retry-after": "1", "content-type": "application/json"},
            body=json.dumps(body).encode(),
        )

    # -- response phase --------------------------------------------------------------

    def bodies(self) -> tuple[str, ...]:
        """The response body only for a cost known after it (``costMetadataKey``)."""
        return ("response",) if self._cost_key is not None else ()

    def on_response_chunk(self, ctx: ResponseContext, chunk: Chunk) -> Awaitable[None] | None:
        """Every piece goes on unchanged; at the end of the body the cost is charged."""
        return self._charge(ctx) if chunk.end_of_stream else None

    async def _charge(self, ctx: ResponseContext) -> None:
        """Charge the cost the metadata holds now (``costMetadataKey``) to the client."""
        cost = ctx.metadata.get(self._cost_key) if self._cost_key is not None else None
        if isinstance(cost, bool) or not isinstance(cost, int) or cost <= 0:
            return
        if DECISION_KEY not in ctx.metadata or ctx.metadata[DECISION_KEY] != "allowed":
            return  # not decided by this policy (condition false, backend error): no bucket
        identifier = self._identifier(ctx.request)
        if self._local is not None:
            now = int(self._clock() * MICROS)
            self._local.take(identifier, now, cost, charge=True)
            return
        assert self._redis is not None
        try:
            await self._redis.take(self._redis_key(ctx.request, identifier), cost, charge=True)
        except BackendUnavailable:
            # Already logged (and counted) by the backend; the answer has gone out.
            return

    def on_response(
        self, ctx: ResponseContext
    ) -> ResponseModifications | Awaitable[ResponseModifications | None] | None:
        """Add the RateLimit headers of the request's decision to the upstream response
        (and charge a buffered response's cost)."""
        if self._cost_key is not None and ctx.body is not None:
            return self._charged_response(ctx)
        return self._headers_of(ctx)

    async def _charged_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        await self._charge(ctx)
        return self._headers_of(ctx)

    def _headers_of(self, ctx: ResponseContext) -> ResponseModifications | None:
        metadata = ctx.metadata
        if _REMAINING_KEY not in metadata:
            return None
        return ResponseModifications(
            set_headers={
                "ratelimit-limit": str(metadata[_LIMIT_KEY]),
                "ratelimit-remaining": str(metadata[_REMAINING_KEY]),
                "ratelimit-reset": str(metadata[_RESET_KEY]),
            }
        )

    @property
    def bucket_count(self) -> int:
        """Buckets kept in this process (local backend; 0 for redis)."""
        return len(self._local) if self._local is not None else 0


def _headers(decision: Decision) -> dict[str, str]:
    return {
        "ratelimit-limit": str(decision.limit),
        "ratelimit-remaining": str(decision.remaining),
        "ratelimit-reset": str(decision.reset_seconds),
    }
