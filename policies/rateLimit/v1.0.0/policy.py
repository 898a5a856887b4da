"""rateLimit v1.0.0: token-bucket rate limiting per client.

Contract:

* Each client identifier gets a bucket holding up to ``burstSize`` tokens
  (default: ``requestsPerSecond`` rounded up), refilled continuously at
  ``requestsPerSecond``. A request takes one token; with less than one token left
  it is answered ``429`` with ``Retry-After`` = seconds until a token is available,
  rounded up to a whole second (at least 1), and a JSON body.
* The identifier is the client IP (``keyBy: clientIp``; the port of an
  ``ip:port`` address is dropped), a request header or a metadata value
  (``keyBy: header|metadata`` with ``keyName``, e.g. ``jwt.sub`` or
  ``apiKey.consumer`` written by an earlier policy). Requests that lack a header or
  metadata identifier share one bucket, so they are limited together rather than not
  at all. The client IP is only Envoy's ``source.address`` attribute
  (``ctx.client_address``), never ``x-forwarded-for``; without it a ``clientIp``
  decision raises :class:`~engine.errors.PolicyError` naming the attribute to add
  (``onError`` decides; the default answers 500), because the request's address is
  unknown, not absent.
* Memory is bounded: at most ``maxKeys`` buckets are kept, and an identifier
  longer than :data:`MAX_KEY_CHARS` characters is stored as its SHA-256 digest
  (32 bytes), so one bucket costs at most ~:data:`BUCKET_BYTES` bytes whatever the
  clients send (measured with tracemalloc in this policy's tests).
* Eviction never hands out tokens: when a new identifier arrives and the table is
  full, the least recently used bucket is evicted only if it has refilled to
  ``burstSize`` (a full bucket and a fresh one are the same, so nobody gains). The
  few least recently used buckets are checked; any bucket idle for
  ``burstSize / requestsPerSecond`` seconds is full, so when the least recently
  used one is not, every kept client was active within that time. If none of
  those checked is full, the new identifier shares one
  **overflow bucket** (same rate and burst) with every other identifier that finds
  the table full, until buckets refill and can be evicted. So cycling through more
  identifiers than ``maxKeys`` never gets more than one extra client's worth of
  requests (fails closed); new clients may be limited together while the table is
  saturated, which is logged (at most once a minute).
* **Several worker processes:** buckets live in this policy instance, in one
  process's memory. Each engine worker process has its own buckets and workers do
  not coordinate (distributed coordination is out of scope of the spec), so the
  effective limit is per worker: with N worker processes a client may get up to N
  times ``requestsPerSecond`` and N times ``burstSize`` in total, depending on how
  its requests are spread over the workers.
* The hook is synchronous and runs on the event loop, so bucket updates need no
  lock. The clock is injectable (``clock=``, default :func:`time.monotonic`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final

from engine.errors import PolicyError
from engine.policy import ImmediateResponse, ParameterError, RequestContext

__all__ = ["BUCKET_BYTES", "MAX_KEY_CHARS", "NO_CLIENT_ADDRESS", "Policy"]

_log = logging.getLogger(__name__)
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

NO_CLIENT_ADDRESS: Final = (
    "keyBy clientIp: Envoy sent no client address; add source.address to the ext_proc "
    "filter's request_attributes (x-forwarded-for is never trusted)"
)
"""The failure of a ``keyBy: clientIp`` decision without Envoy's ``source.address``."""

MAX_KEY_CHARS: Final = 64
"""Identifiers longer than this are kept as their SHA-256 digest."""
BUCKET_BYTES: Final = 600
"""Upper bound of the memory one bucket holds (key, bucket, table slot), measured."""
_EVICTION_SCAN: Final = 8
_OVERFLOW_LOG_INTERVAL: Final = 60.0


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


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated

    def refill(self, now: float, rate: float, burst: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(burst, self.tokens + elapsed * rate)
        self.updated = now


_Key = str | bytes | None
"""A bucket key: the identifier, its SHA-256 digest (bytes) when long, or ``None``
for requests without one. Digests are bytes so no identifier can collide with one."""


class Policy:
    """Token-bucket limiter; see the module docstring for the contract."""

    # Constructing reads nothing from the host: the control plane may run it too.
    pure_constructor = True

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """The limit, what it is counted per, and what a limited request gets."""
        rate = params["requestsPerSecond"]
        key_by = str(params["keyBy"])
        said: dict[str, Any] = {
            "limit": f"{rate:g} requests/s, burst {params.get('burstSize') or math.ceil(rate)}",
            "per": key_by if params.get("keyName") is None else f"{key_by} {params['keyName']}",
            "rejects": "429 over the limit",
            "backend": "local (this engine process)",
        }
        return said

    def __init__(
        self, params: Mapping[str, Any], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = float(params["requestsPerSecond"])
        burst = params.get("burstSize")
        self._burst = float(burst if burst is not None else max(1, math.ceil(self._rate)))
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
        self._max_keys = int(params["maxKeys"])
        self._clock = clock
        self._buckets: OrderedDict[_Key, _Bucket] = OrderedDict()
        self._overflow = _Bucket(self._burst, clock())
        self._overflow_logged = -math.inf

    def _identifier(self, ctx: RequestContext) -> _Key:
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
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if len(text) <= MAX_KEY_CHARS:
            return text
        # surrogatepass: a lone surrogate (possible in metadata) must not raise.
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    def _bucket(self, key: _Key, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            bucket.refill(now, self._rate, self._burst)
            return bucket
        if len(self._buckets) >= self._max_keys and not self._evict_a_full_bucket(now):
            self._overflow.refill(now, self._rate, self._burst)
            if now - self._overflow_logged >= _OVERFLOW_LOG_INTERVAL:
                self._overflow_logged = now
                _log.warning(
                    "rateLimit: %d buckets kept (maxKeys) and none has refilled: "
                    "new clients share one overflow bucket",
                    len(self._buckets),
                )
            return self._overflow
        bucket = self._buckets[key] = _Bucket(self._burst, now)
        return bucket

    def _evict_a_full_bucket(self, now: float) -> bool:
        """Evict one of the least recently used buckets that has refilled to the
        burst size; ``False`` if none of the first few has."""
        for index, (key, bucket) in enumerate(self._buckets.items()):
            if index >= _EVICTION_SCAN:
                break
            if bucket.tokens + max(0.0, now - bucket.updated) * self._rate >= self._burst:
                del self._buckets[key]
                return True
        return False

    def on_request(self, ctx: RequestContext) -> ImmediateResponse | None:
        """Take a token from the client's bucket, or answer 429 when there is none."""
        bucket = self._bucket(self._identifier(ctx), self._clock())
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        # Rounded before ceil so float noise (2.0000000001) does not add a second.
        retry_after = max(1, math.ceil(round((1.0 - bucket.tokens) / self._rate, 6)))
        body = {
            "error": "too_many_requests",
            "message": "rate limit exceeded",
            "retryAfterSeconds": retry_after,
        }
        return ImmediateResponse(
            status=429,
            headers={"retry-after": str(retry_after), "content-type": "application/json"},
            body=json.dumps(body).encode(),
        )

    @property
    def bucket_count(self) -> int:
        """Number of buckets currently kept (for tests and debugging)."""
        return len(self._buckets)
