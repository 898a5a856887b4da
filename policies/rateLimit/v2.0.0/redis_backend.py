"""The ``redis`` backend of rateLimit v2.0.0: one GCRA decision per request, in Redis.

Contract:

* One round trip per decision: ``EVALSHA`` of ``gcra.lua`` (redis-py's ``Script``
  loads it again after a ``NOSCRIPT``, e.g. when Redis restarted). The script is
  atomic, reads the clock of the Redis server (one clock for every engine) and
  gives each key a ``PX`` expiry at the moment its bucket is full again, so Redis
  memory holds only clients that are refilling.
* Connections: one ``redis.asyncio`` client (a bounded connection pool) per Redis
  URL per event loop, shared by every policy instance (every route) of the worker
  process. It is created lazily on the running loop at the first decision, never
  at config load: workers fork before their loop runs, and a pool made in the
  parent must never be used by two processes (inherited entries are also dropped
  in a forked child, ``os.register_at_fork``).
* Failures: every call is bounded by the policy's ``backendTimeout``; redis-py's
  own retries are off. Two kinds, kept apart so that one route cannot switch the
  others to ``onBackendError``:

  - A failure that is a fact about Redis (connection refused or reset, redis-py's
    connect timeout, an error reply, a malformed reply) marks that Redis *down* for
    the worker (every route): one WARNING line, then decisions follow
    ``onBackendError`` immediately without touching Redis, and at most one request
    per :data:`RETRY_INTERVAL` probes it. The first success marks it *up* again (one
    INFO line).
  - A decision that runs out of its own ``backendTimeout`` says only that Redis is
    slower than THIS policy instance allows (a 5 ms route against a Redis answering in
    20 ms): it marks only that instance *slow* (one WARNING line): its decisions
    follow ``onBackendError`` at once, one per :data:`RETRY_INTERVAL` probes, and the
    first in time marks it fast again (one INFO line). Other instances (routes) with a
    longer ``backendTimeout`` keep asking Redis.

  So a dead or slow Redis never hangs a request and logs one line per transition,
  not per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engine import metrics
from engine.secrets import redact_url

if TYPE_CHECKING:  # see policy.py: relative at run time, top-level for mypy
    from gcra import Decision
else:
    from .gcra import Decision

__all__ = [
    "MAX_CONNECTIONS",
    "RETRY_INTERVAL",
    "BackendUnavailable",
    "RedisBackend",
    "aclose_clients",
    "check_redis_url",
    "is_up",
    "redact",
]

log: Final = logging.getLogger("policies.rateLimit.redis")

RETRY_INTERVAL: Final = 0.5
"""Seconds between probes of a Redis marked down (other requests do not wait)."""

MAX_CONNECTIONS: Final = 64
"""Connections per Redis URL per worker; more concurrent decisions wait (bounded by the
policy's backendTimeout)."""

_SCRIPT: Final = (Path(__file__).resolve().parent / "gcra.lua").read_text()


class BackendUnavailable(Exception):
    """Redis could not decide (down, marked down, slow, or answered nonsense)."""


def check_redis_url(url: str) -> str:
    """The problem with ``url``'s form, or ``""`` when it is acceptable.

    Accepted: ``redis://`` or ``rediss://`` (TLS), a host, an optional port
    (1-65535), an optional database ``/N`` (0-15... any non-negative integer), optional
    credentials. Nothing is contacted. Messages never repeat the password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{redact(url)!r} is not a valid URL ({exc})"
    shown = redact(url)
    if parts.scheme not in ("redis", "rediss"):
        return f"{shown!r}: scheme must be redis:// or rediss://"
    if not parts.hostname:
        return f"{shown!r}: no host"
    if port is not None and not 1 <= port <= 65535:
        return f"{shown!r}: port must be 1-65535"
    if parts.netloc.endswith(":"):
        return f"{shown!r}: empty port"
    db = parts.path.removeprefix("/")
    if db and not db.isdigit():
        return f"{shown!r}: database must be a number (redis://host:6379/0)"
    if parts.query or parts.fragment:
        return f"{shown!r}: query and fragment are not supported"
    return ""


def redact(url: str) -> str:
    """``url`` as logs and errors show it: :func:`engine.secrets.redact_url`, the one
    redaction the control plane and config errors use too (password, or a lone
    userinfo, replaced by ``<redacted>``)."""
    return redact_url(url)


@dataclass(slots=True)
class _Shared:
    """One Redis URL on one event loop: its client, script and health."""

    client: aredis.Redis
    script: Any
    up: bool = True
    next_probe: float = 0.0
    probing: bool = False
    transitions: int = 0
    errors: int = field(default=0)


# loop -> URL -> shared client. Weak on the loop: a finished loop (tests, asyncio.run in a
# worker) takes its clients with it; a new loop gets new connections.
_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Shared]] = (
    weakref.WeakKeyDictionary()
)


def _forget_inherited() -> None:
    _SHARED.clear()


os.register_at_fork(after_in_child=_forget_inherited)


def _shared(url: str) -> _Shared:
    loop = asyncio.get_running_loop()
    per_loop = _SHARED.get(loop)
    if per_loop is None:
        per_loop = _SHARED[loop] = {}
    shared = per_loop.get(url)
    if shared is None:
        pool = aredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=None,  # waiting for a free connection is bounded by backendTimeout
            socket_connect_timeout=1.0,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),  # our timeout and fallback decide, not retries
            # CLIENT LIST names the worker holding each connection.
            client_name=f"policy-engine-{os.getpid()}",
        )
        client = aredis.Redis(connection_pool=pool)
        shared = per_loop[url] = _Shared(client=client, script=client.register_script(_SCRIPT))
    return shared


class RedisBackend:
    """Decisions for one policy instance, from the Redis at ``url``.

    ``interval``/``burst`` are the GCRA parameters (see ``gcra.py``); ``timeout`` bounds
    each decision in seconds; ``key_prefix`` starts every key. :meth:`take` raises
    :class:`BackendUnavailable` when Redis cannot decide in time. The health of the Redis
    itself is shared by the worker's instances; being too slow for ``timeout`` is this
    instance's own state (see the module docstring).
    """

    __slots__ = ("_args", "_label", "_prefix", "_probing", "_slow_until", "_timeout", "url")

    def __init__(
        self, url: str, *, interval: int, burst: int, timeout: float, key_prefix: str
    ) -> None:
        self.url = url
        self._label = redact(url)
        self._args = (interval, burst)
        self._timeout = timeout
        self._prefix = key_prefix
        # Monotonic time of this instance's next probe after a timeout; 0: not slow.
        self._slow_until = 0.0
        self._probing = False

    @property
    def slow(self) -> bool:
        """Whether this instance's last decision ran out of its ``backendTimeout`` (and no
        probe has been answered in time since)."""
        return self._slow_until != 0.0

    def key(self, scope: str, identity: str) -> str:
        """The Redis key: prefix, scope (route key or configured scope), then a hash of
        the identity (bounded length; no client value such as an IP stored in clear)."""
        digest = hashlib.blake2b(identity.encode("utf-8", "surrogatepass"), digest_size=16)
        return f"{self._prefix}{scope}:{digest.hexdigest()}"

    async def take(self, key: str, cost: int = 1, *, charge: bool = False) -> Decision:
        """One decision for ``key`` (see ``gcra.lua``; ``cost``/``charge`` as in
        ``gcra.decide``)."""
        shared = _shared(self.url)
        now = time.monotonic()
        probe = own_probe = False
        if not shared.up:
            if shared.probing or now < shared.next_probe:
                raise BackendUnavailable(f"Redis {self._label} is marked down")
            probe = True
        if self._slow_until:
            if self._probing or now < self._slow_until:
                raise BackendUnavailable(
                    f"Redis {self._label} was slower than backendTimeout ({self._timeout}s)"
                )
            own_probe = True
        shared.probing = shared.probing or probe
        self._probing = self._probing or own_probe
        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline:
                args = [*self._args, cost, 1 if charge else 0]
                reply = await shared.script(keys=[key], args=args)
            decision = _parse(reply, self._args[1])
        except Exception as exc:  # redis errors (connection, reply), a malformed reply
            if deadline.expired():  # our own deadline: this instance's budget, not Redis
                self._too_slow(shared, probe)
                raise BackendUnavailable(f"Redis {self._label}: timed out") from exc
            self._down(shared, exc)
            raise BackendUnavailable(f"Redis {self._label}: {_describe(exc)}") from exc
        finally:
            if probe:
                shared.probing = False
            if own_probe:
                self._probing = False
        # Only the probe brings Redis back: a late success of a call that started before
        # Redis was marked down must not flip the state (up/down/up... log lines).
        if probe and not shared.up:
            shared.up = True
            shared.transitions += 1
            log.info("rateLimit: Redis %s is reachable again: limiting resumes", self._label)
        if own_probe and self._slow_until:
            self._slow_until = 0.0
            log.info(
                "rateLimit: Redis %s answers within backendTimeout (%ss) again",
                self._label,
                self._timeout,
            )
        return decision

    def _too_slow(self, shared: _Shared, probe: bool) -> None:
        shared.errors += 1
        metrics.ratelimit_backend_error("redis")
        now = time.monotonic()
        if probe:  # a probe of a Redis marked down that timed out: it stays down
            shared.next_probe = now + RETRY_INTERVAL
        if not self._slow_until:
            log.warning(
                "rateLimit: Redis %s did not answer within backendTimeout (%ss): this "
                "policy's decisions follow onBackendError until one does (probed every "
                "%.1fs); other routes keep asking Redis",
                self._label,
                self._timeout,
                RETRY_INTERVAL,
            )
        self._slow_until = now + RETRY_INTERVAL

    def _down(self, shared: _Shared, exc: BaseException) -> None:
        shared.errors += 1
        metrics.ratelimit_backend_error("redis")
        shared.next_probe = time.monotonic() + RETRY_INTERVAL
        if shared.up:
            shared.up = False
            shared.transitions += 1
            log.warning(
                "rateLimit: Redis %s unavailable (%s): decisions follow onBackendError "
                "until it answers again (probed every %.1fs)",
                self._label,
                _describe(exc),
                RETRY_INTERVAL,
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parse(reply: object, burst: int) -> Decision:
    if not isinstance(reply, list) or len(reply) != 4 or not all(isinstance(v, int) for v in reply):
        raise BackendUnavailable(f"unexpected script reply {reply!r}")
    allowed, remaining, retry_after, reset = reply
    return Decision(bool(allowed), burst, remaining, retry_after, reset)


async def aclose_clients() -> None:
    """Close the running loop's shared clients (tests; a stopping worker may call it)."""
    per_loop = _SHARED.pop(asyncio.get_running_loop(), {})
    for shared in per_loop.values():
        await shared.client.aclose()
        await shared.client.connection_pool.disconnect()


def is_up(url: str) -> bool | None:
    """Whether ``url`` is currently considered up on the running loop (``None``: unused)."""
    per_loop = _SHARED.get(asyncio.get_running_loop(), {})
    shared = per_loop.get(url)
    return None if shared is None else shared.up
