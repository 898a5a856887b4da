"""jwtValidation v1.0.0: validate JWT bearer tokens against an HTTPS JWKS.

Contract:

* The token is read from ``header`` (default ``authorization``) after ``prefix``
  (default ``"Bearer "``, matched case-insensitively). Without a token the answer
  is ``401`` with ``WWW-Authenticate: Bearer`` (RFC 6750 section 3.1: no error
  code when no credentials were sent).
* A token is accepted only if: its ``alg`` is in ``algorithms`` (asymmetric
  algorithms only; ``none`` and ``HS*`` cannot even be configured, so a token
  "signed" with the public key as an HMAC secret is rejected before any key is
  used); its header names a ``kid`` present in the JWKS whose key type, and
  ``alg`` if the JWK states one, fit that algorithm; the signature verifies
  (RSA keys under 2048 bits are refused); ``iss`` equals ``issuer``; ``aud``
  contains one of ``audiences``; ``exp`` is present and not passed, and ``nbf``
  / ``iat`` are not in the future, each with ``clockSkew`` leeway. Any failure
  is ``401`` with ``WWW-Authenticate: Bearer error="invalid_token",
  error_description="..."`` (fixed texts, never token content) and a JSON body.
* On success ``ctx.metadata["jwt.sub"]`` holds the ``sub`` claim (``None`` if
  absent) and ``ctx.metadata["jwt.claims"]`` all claims; the request is not
  modified.
* Keys: see :class:`JwksCache`. All network I/O of the policy is in that class
  and :func:`fetch_jwks` (aiohttp on the event loop, never a thread). The JWKS is
  fetched on first use (not at config time); then when a token names an unknown
  ``kid`` (the request waits for that fetch), at most once per
  ``minRefreshInterval`` (failed attempts count); and in the background once the
  keys are older than ``jwksCacheTtl`` (an optional parameter added to
  v1.0.0 later, default 5m, so existing configs keep validating), while the cached keys keep serving
  (stale-while-revalidate: no request waits for a TTL refresh). One fetch at a
  time, owned by the cache: a request that is cancelled while waiting never
  cancels it. ``fetchTimeout`` bounds a whole fetch (connect, TLS, redirects,
  body); the body is capped at :data:`MAX_JWKS_BYTES`. A successful fetch replaces
  the whole key set, so a key removed by the IdP stops working at the next
  refresh; a failed fetch keeps the cached keys, so during an outage known keys
  keep working (even past the TTL) while tokens that need a new key fail closed
  (401). TLS contexts are shared by every instance with the same ``caFile``.
* Verified tokens: see ``token_cache.py``. A token that passed every check is kept
  (per instance, so per issuer/audience configuration, and per worker) by the
  SHA-256 of its bytes, with its signed payload and time claims; the same bytes
  then skip parsing and signature verification while the JWKS generation that
  verified them is current (any change to the key set, e.g. a key removed at a
  refresh, empties the cache; a hit still starts the TTL refresh). ``exp``, ``nbf``
  and ``iat`` are checked with ``clockSkew`` on every request, cached or not, and
  an expired entry is dropped. Failures are never cached. At most
  ``token_cache.MAX_ENTRIES`` tokens and ``MAX_BYTES`` accounted bytes per instance.

This version is self-contained (v2.0.0 duplicates rather than imports it), so
either version can be removed from the registry alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urljoin, urlsplit

import aiohttp
import jwt
from jwt import PyJWK
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)
from jwt.utils import base64url_decode

from engine.definition import parse_duration
from engine.policy import ImmediateResponse, ParameterError, RequestContext
from engine.secrets import redact_url

# A sibling module. The engine loads this folder as a package, so it is a relative
# import at run time; mypy checks the folder as its base (a version folder is no
# package name), where it is a top-level module.
if TYPE_CHECKING:
    from token_cache import MAX_BYTES, MAX_ENTRIES, TokenCache, Verified, token_key
else:
    from .token_cache import MAX_BYTES, MAX_ENTRIES, TokenCache, Verified, token_key

__all__ = ["MAX_JWKS_BYTES", "JwksCache", "JwksError", "Policy", "fetch_jwks", "ssl_context"]

_log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
MAX_JWKS_BYTES: Final = 1 << 20
"""Largest JWKS accepted (1 MiB; real ones are a few KB): bounds memory and parse time."""
_MAX_REDIRECTS: Final = 5
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


# --------------------------------------------------------------------------- JWKS I/O


class JwksError(Exception):
    """The JWKS could not be fetched or is not a JWK set."""


_contexts: dict[tuple[str | None, int, int], ssl.SSLContext] = {}
_contexts_lock = threading.Lock()  # config may be loaded off the event loop


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """The verifying client TLS context for ``ca_file`` (``None``: the system store),
    shared by every instance with the same CA setting.

    Building a context costs ~20 ms (it parses the whole trust store), so a config
    with hundreds of JWT routes would otherwise spend seconds on it. The cache key
    includes the file's mtime and size, so a rotated CA file is read again at the
    next config load. Raises :class:`ParameterError` (field ``caFile``) when the
    file cannot be loaded.
    """
    try:
        stat = os.stat(ca_file) if ca_file is not None else None
        key = (ca_file, stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
        with _contexts_lock:
            context = _contexts.get(key)
            if context is None:
                context = _contexts[key] = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ParameterError("caFile", f"cannot load CA certificates: {exc}") from exc
    return context


async def fetch_jwks(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    """GET ``url`` with ``session`` and return its ``keys`` (JWK objects only).

    Follows at most :data:`_MAX_REDIRECTS` redirects, each only to an ``https://``
    URL (a redirect must not downgrade the fetch to plain HTTP, which config
    validation forbids). Reads at most :data:`MAX_JWKS_BYTES` (after decompression).
    Has no deadline of its own: the caller bounds the whole fetch. Raises
    :class:`JwksError` for any network, HTTP, size or format problem.
    """
    target = url
    try:
        for _ in range(_MAX_REDIRECTS + 1):
            async with session.get(
                target, allow_redirects=False, headers={"accept": "application/json"}
            ) as response:
                # Every answer is read to its end, so its connection can be reused.
                body = await _read_capped(response)
                if response.status in _REDIRECTS and "location" in response.headers:
                    target = urljoin(str(response.url), response.headers["location"])
                    if urlsplit(target).scheme != "https":
                        raise JwksError(f"{url}: redirect to a non-HTTPS URL refused")
                    continue
                if response.status != 200:
                    raise JwksError(f"{url}: HTTP {response.status}")
                break
        else:
            raise JwksError(f"{url}: more than {_MAX_REDIRECTS} redirects")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        # ValueError: a malformed Location; OSError covers TLS verification errors.
        raise JwksError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from exc
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise JwksError(f"{url}: JWKS is not JSON: {exc}") from exc
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise JwksError(f"{url}: JWKS has no 'keys' list")
    return [key for key in keys if isinstance(key, dict)]


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, at most :data:`MAX_JWKS_BYTES`. A body abandoned half-read
    (too large, the deadline, cancellation) aborts its connection at once: a graceful
    TLS close would wait on a server that may be the reason we gave up."""
    try:
        if (response.content_length or 0) > MAX_JWKS_BYTES:
            raise JwksError(f"{response.url}: JWKS larger than {MAX_JWKS_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > MAX_JWKS_BYTES:
                raise JwksError(f"{response.url}: JWKS larger than {MAX_JWKS_BYTES} bytes")
            chunks.append(chunk)
    except BaseException:
        connection = response.connection
        if connection is not None and connection.transport is not None:
            connection.transport.abort()
        raise
    return b"".join(chunks)


class JwksCache:
    """The signing keys of one policy instance, by ``kid``.

    * :meth:`key` never waits for a fetch when the ``kid`` is cached: keys older
      than ``ttl`` are still served while one background fetch replaces them
      (stale-while-revalidate), so a TTL refresh delays no request.
    * An unknown ``kid`` waits for a fetch, at most one per
      ``min_refresh_interval`` seconds of ``clock`` (failed attempts count). Every
      fetch runs as one task owned by this cache; concurrent callers await that
      task through :func:`asyncio.shield`, so a caller that is cancelled (client
      gone, Envoy's message timeout, the policy ``timeout``) never cancels the
      fetch: its result is cached for everyone else.
    * A fetch has a total deadline of ``timeout`` seconds (connect, TLS, redirects
      and body together), so a server trickling bytes cannot hold it open. A
      successful fetch replaces the whole key set; a failed one keeps the cached
      keys (expired or not) and is logged.
    * Keys without a string ``kid``, or with a ``use`` other than ``sig``, are
      ignored.
    * Each fetch opens its own aiohttp client inside the running event loop (its
      redirect hops reuse one connection) and closes it when done, so nothing is
      held between fetches: those are at least ``min_refresh_interval`` apart, and
      an instance dropped by a config reload has nothing left to close. (A kept
      connection would save ~5 ms and ~4 ms CPU per fetch, measured; see the
      README's decisions.) :meth:`aclose` cancels a fetch in flight.
    * :attr:`generation` changes whenever a fetch changes the key set (a key
      removed, replaced or added; a refetch of the same keys keeps it), so a
      verdict reached with one generation's key is stale once it differs.
    """

    def __init__(
        self,
        url: str,
        *,
        context: ssl.SSLContext,
        timeout: float,
        min_refresh_interval: float,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._context = context
        self._timeout = timeout
        self._min_interval = min_refresh_interval
        self._ttl = ttl
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] = {}
        self._prepared: dict[tuple[str, str], PyJWK] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._generation = 0

    @property
    def generation(self) -> int:
        """Changes whenever a fetch changes the key set (see the class docstring)."""
        return self._generation

    def revalidate(self) -> int:
        """What :meth:`key` does for a cached ``kid`` without the key: start the
        background refresh when the keys are older than ``ttl``. Returns
        :attr:`generation` (for a verdict cached without asking for a key)."""
        if self._fetched_at is not None and self._clock() - self._fetched_at >= self._ttl:
            self._start_refresh(self._clock())
        return self._generation

    async def key(self, kid: str, alg: str) -> PyJWK | None:
        """The key ``kid`` prepared for ``alg``, or ``None`` if there is no such
        usable key (unknown after a refresh, refresh not allowed yet or failed,
        or a key whose type or stated ``alg`` does not fit ``alg``)."""
        now = self._clock()
        if kid in self._keys:
            if self._fetched_at is not None and now - self._fetched_at >= self._ttl:
                self._start_refresh(now)  # in the background: serve the cached key now
            return self._prepare(kid, alg)
        task = self._start_refresh(now)
        if task is not None:
            await asyncio.shield(task)  # our cancellation must not cancel the fetch
        return self._prepare(kid, alg)

    def _prepare(self, kid: str, alg: str) -> PyJWK | None:
        jwk_data = self._keys.get(kid)
        if jwk_data is None or jwk_data.get("alg", alg) != alg:
            return None
        prepared = self._prepared.get((kid, alg))
        if prepared is None:
            try:
                prepared = PyJWK(jwk_data, algorithm=alg)
            except PyJWTError as exc:
                _log.info("jwtValidation: JWKS key %r unusable for %s: %s", kid, alg, exc)
                return None
            self._prepared[(kid, alg)] = prepared
        return prepared

    @property
    def context(self) -> ssl.SSLContext:
        """The TLS context fetches use (shared per ``caFile``, see :func:`ssl_context`)."""
        return self._context

    async def settle(self) -> None:
        """Wait until no fetch is in flight (for tests and orderly shutdown)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def aclose(self) -> None:
        """Cancel a fetch in flight (tests, orderly shutdown). The cache stays usable."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _start_refresh(self, now: float) -> asyncio.Task[None] | None:
        """The fetch in flight, else a new one if pacing allows, else ``None``."""
        if self._task is not None:
            return self._task
        if self._last_attempt is not None and now - self._last_attempt < self._min_interval:
            return None
        self._last_attempt = now
        self._task = asyncio.get_running_loop().create_task(
            self._refresh(), name=f"jwtValidation JWKS fetch {self._url}"
        )
        return self._task

    async def _refresh(self) -> None:
        # One connector per fetch, closed without waiting on the server's TLS
        # close_notify (the body is complete or abandoned): the deadline covers the
        # fetch, and nothing outlives it.
        connector = aiohttp.TCPConnector(ssl=self._context, limit=1)
        try:
            async with (
                asyncio.timeout(self._timeout),
                aiohttp.ClientSession(
                    connector=connector,
                    connector_owner=False,
                    timeout=aiohttp.ClientTimeout(total=None),  # ours bounds everything
                    trust_env=False,  # no proxy or netrc from the environment
                ) as session,
            ):
                keys = await fetch_jwks(session, self._url)
        except TimeoutError:
            self._failed(f"no complete answer from {self._url} within {self._timeout:g}s")
        except JwksError as exc:
            self._failed(str(exc))
        except Exception as exc:  # never let a surprise kill pacing or leak to waiters
            _log.exception("jwtValidation: JWKS refresh failed unexpectedly")
            self._failed(f"{type(exc).__name__}: {exc}")
        else:
            fetched = {
                key["kid"]: key
                for key in keys
                if isinstance(key.get("kid"), str) and key.get("use", "sig") == "sig"
            }
            if fetched != self._keys:
                self._generation += 1
            self._keys = fetched
            self._prepared = {}
            self._fetched_at = self._clock()
        finally:
            self._task = None
            await connector.close(abort_ssl=True)

    def _failed(self, reason: str) -> None:
        _log.warning(
            "jwtValidation: JWKS refresh failed, keeping %d cached key(s): %s",
            len(self._keys),
            reason,
        )


# --------------------------------------------------------------------------- policy


def _unauthorized(description: str | None) -> ImmediateResponse:
    if description is None:
        challenge = "Bearer"
        body = {"error": "unauthorized", "message": "missing bearer token"}
    else:
        challenge = f'Bearer error="invalid_token", error_description="{description}"'
        body = {"error": "invalid_token", "message": description}
    return ImmediateResponse(
        status=401,
        headers={"www-authenticate": challenge, "content-type": "application/json"},
        body=json.dumps(body).encode(),
    )


class Policy:
    """Validates bearer tokens; see the module docstring for the contract.

    ``clock`` (monotonic seconds) only paces JWKS refreshes; token times are
    checked against the wall clock, by PyJWT when a token is verified and against
    ``wall_clock`` (Unix seconds; tests pass a fake) on every request, so also for
    a token from the verified-token cache, bounded by ``max_cached_tokens`` and
    ``max_cached_bytes`` (see ``token_cache.py``).
    """

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """What a request must carry to pass, and where the keys come from."""
        header = str(params["header"])
        scheme = params["prefix"]
        said: dict[str, Any] = {
            "requires": f"a JWT in the {header} header (prefix {scheme!r})",
            "issuer": params["issuer"],
            "audiences": list(params["audiences"]),
            "algorithms": list(params["algorithms"]),
            "jwks": redact_url(str(params["jwksUrl"])),
            "clockSkew": params["clockSkew"],
            "rejects": "401 without a valid token",
            "writesMetadata": ["jwt.sub", "jwt.claims"],
        }
        return said

    def __init__(
        self,
        params: Mapping[str, Any],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_cached_tokens: int = MAX_ENTRIES,
        max_cached_bytes: int = MAX_BYTES,
    ) -> None:
        url = str(params["jwksUrl"])
        if not url.startswith("https://"):  # the schema checks too; never fetch over HTTP
            raise ParameterError("jwksUrl", "must be HTTPS")
        self._algorithms = tuple(params["algorithms"])
        for index, alg in enumerate(self._algorithms):
            if alg not in ALLOWED_ALGORITHMS:
                raise ParameterError(f"algorithms[{index}]", f"{alg!r} is not allowed")
        self._issuer = str(params["issuer"])
        self._audiences = [str(aud) for aud in params["audiences"]]
        self._header = str(params["header"]).lower()
        self._prefix = str(params["prefix"]).lower()
        self._leeway = parse_duration(params["clockSkew"])
        self._jwks = JwksCache(
            url,
            context=ssl_context(params.get("caFile")),
            timeout=parse_duration(params["fetchTimeout"]),
            min_refresh_interval=parse_duration(params["minRefreshInterval"]),
            ttl=parse_duration(params["jwksCacheTtl"]),
            clock=clock,
        )
        self._wall_clock = wall_clock
        self._tokens = TokenCache(max_cached_tokens, max_cached_bytes)

    @property
    def jwks(self) -> JwksCache:
        """This instance's key cache (tests use :meth:`JwksCache.settle`)."""
        return self._jwks

    @property
    def token_cache(self) -> TokenCache:
        """This instance's verified tokens (tests read its size and hits)."""
        return self._tokens

    async def aclose(self) -> None:
        """Cancel a JWKS fetch in flight (see :meth:`JwksCache.aclose`)."""
        await self._jwks.aclose()

    def _token(self, ctx: RequestContext) -> str | None:
        value = ctx.headers.get(self._header, "")
        if value[: len(self._prefix)].lower() != self._prefix:
            return None
        return value[len(self._prefix) :].strip() or None

    async def _claims(self, token: str) -> dict[str, Any] | ImmediateResponse:
        """The claims of ``token`` if it passes every check now, else the 401: from
        the verified-token cache when the same bytes were verified under the current
        key set, else verified (and cached if valid). Time claims are checked here
        on every request."""
        key = token_key(token)
        entry = self._tokens.get(key, self._jwks.revalidate())
        claims: dict[str, Any] | None = None
        if entry is None:
            verified = await self._verify(token)
            if isinstance(verified, ImmediateResponse):
                return verified
            entry, claims = verified
            self._tokens.put(key, entry, len(token))
        refusal = entry.refusal(self._wall_clock(), self._leeway)
        if refusal is not None:
            self._tokens.discard(key)
            return _unauthorized(refusal)
        # A fresh object per request (from the signed bytes): no request can change
        # the claims another one sees.
        return claims if claims is not None else json.loads(entry.payload)

    async def _verify(self, token: str) -> tuple[Verified, dict[str, Any]] | ImmediateResponse:
        """Every check by PyJWT (signature, claims, times with the real clock): the
        cache entry and the claims, else the 401."""
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            return _unauthorized("malformed token")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._algorithms:
            return _unauthorized("signature algorithm not allowed")
        if not isinstance(kid, str) or not kid:
            return _unauthorized("token has no key id")
        key = await self._jwks.key(kid, alg)
        # No await from here on: the key came from this generation's key set.
        generation = self._jwks.generation
        if key is None:
            return _unauthorized("no usable key for the token's key id")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._audiences,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp"], "enforce_minimum_key_length": True},
            )
        except ExpiredSignatureError:
            return _unauthorized("token expired")
        except ImmatureSignatureError:
            return _unauthorized("token not yet valid")
        except InvalidAudienceError:
            return _unauthorized("audience not accepted")
        except InvalidIssuerError:
            return _unauthorized("issuer not accepted")
        except MissingRequiredClaimError as exc:
            return _unauthorized(f"token has no {exc.claim} claim")
        except InvalidSignatureError:
            return _unauthorized("signature verification failed")
        except PyJWTError:
            return _unauthorized("invalid token")
        # The payload segment exactly as PyJWT split and decoded it; the integers
        # exactly as it compared them (it has checked that int() accepts each).
        payload = base64url_decode(token.rsplit(".", 1)[0].split(".", 1)[1])
        starts = [int(claims[name]) for name in ("iat", "nbf") if name in claims]
        entry = Verified(
            payload=payload,
            generation=generation,
            expires=int(claims["exp"]),
            not_before=max(starts) if starts else None,
        )
        return entry, claims

    async def on_request(self, ctx: RequestContext) -> ImmediateResponse | None:
        """``None`` for a valid token (claims in metadata), else a 401 response."""
        token = self._token(ctx)
        if token is None:
            return _unauthorized(None)
        claims = await self._claims(token)
        if isinstance(claims, ImmediateResponse):
            return claims
        ctx.metadata["jwt.sub"] = claims.get("sub")
        ctx.metadata["jwt.claims"] = claims
        return None
