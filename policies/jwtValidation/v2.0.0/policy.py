"""jwtValidation v2.0.0: validate JWT bearer tokens; copy claims to upstream headers.

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
  absent) and ``ctx.metadata["jwt.claims"]`` all claims.
* New in v2, claim headers: for each name in ``claimHeaders`` the request gets
  header ``headerPrefix + name`` (lower-cased) set to the claim: strings as they
  are, other JSON values as compact JSON (``true``, ``42``, ``["a","b"]``). A
  claim that is absent, or a string holding CR, LF or NUL, yields no header.
  Every incoming header that starts with ``headerPrefix`` and is not set from a
  claim is removed, so a client can never supply one itself. Without
  ``claimHeaders`` only the spoofable prefixed headers are removed.
* Keys: see :class:`JwksCache`. All network I/O of the policy is in that class
  and :func:`fetch_jwks`; it runs in a worker thread so the event loop never
  blocks. The JWKS is fetched on first use (not at config time), then when a
  token names an unknown ``kid`` or the keys are older than ``jwksCacheTtl``
  (new in v2), at most once per ``minRefreshInterval`` (failed attempts count;
  a TTL shorter than that interval acts as the interval). A successful fetch
  replaces the whole key set, so a key removed by the IdP stops working at the
  next refresh; a failed fetch keeps the cached keys, so during an outage known
  keys keep working (even past the TTL) while tokens that need a new key fail
  closed (401).

This version is self-contained (it duplicates rather than imports v1.0.0), so
either version can be removed from the registry alone.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import IO, Any, Final
from urllib.parse import urlsplit

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

from engine.definition import parse_duration
from engine.policy import (
    ImmediateResponse,
    ParameterError,
    RequestContext,
    RequestModifications,
)

__all__ = ["JwksCache", "JwksError", "Policy", "fetch_jwks"]

_log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_MAX_JWKS_BYTES: Final = 1 << 20
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FORBIDDEN_IN_VALUE: Final = re.compile(r"[\r\n\x00]")


# --------------------------------------------------------------------------- JWKS I/O


class JwksError(Exception):
    """The JWKS could not be fetched or is not a JWK set."""


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to ``https://`` URLs: a redirect must not downgrade
    the fetch to plain HTTP, which config validation forbids."""

    def redirect_request(  # noqa: PLR0917 - signature fixed by urllib
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme != "https":
            raise urllib.error.HTTPError(
                newurl, code, "redirect to a non-HTTPS URL refused", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def make_opener(context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    """A urllib opener verifying TLS with ``context`` and refusing HTTPS->HTTP redirects."""
    return urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _HttpsOnlyRedirects()
    )


def fetch_jwks(
    url: str, opener: urllib.request.OpenerDirector, timeout: float
) -> list[dict[str, Any]]:
    """GET ``url`` and return its ``keys`` (JWK objects only). Blocking: call it in
    a thread. Raises :class:`JwksError` for any network, HTTP, size or format problem."""
    request = urllib.request.Request(url, headers={"accept": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as response:
            body: bytes = response.read(_MAX_JWKS_BYTES + 1)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # URLError, HTTPError, ssl.SSLError and timeouts are all OSErrors.
        raise JwksError(f"cannot fetch {url}: {exc}") from exc
    if len(body) > _MAX_JWKS_BYTES:
        raise JwksError(f"{url}: JWKS larger than {_MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise JwksError(f"{url}: JWKS is not JSON: {exc}") from exc
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise JwksError(f"{url}: JWKS has no 'keys' list")
    return [key for key in keys if isinstance(key, dict)]


class JwksCache:
    """The signing keys of one policy instance, by ``kid``.

    :meth:`key` fetches the JWKS when ``kid`` is unknown or the keys are older
    than ``ttl``, at most once per ``min_refresh_interval`` seconds of ``clock``
    (concurrent callers share one fetch); expired keys stay in use while a
    refetch fails. Keys without a string ``kid``, or with a ``use`` other than ``sig``,
    are ignored. The blocking fetch runs via :func:`asyncio.to_thread`.
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
        self._ttl = ttl
        self._fetched_at: float | None = None
        self._opener = make_opener(context)
        self._timeout = timeout
        self._min_interval = min_refresh_interval
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] = {}
        self._prepared: dict[tuple[str, str], PyJWK] = {}
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()

    async def key(self, kid: str, alg: str) -> PyJWK | None:
        """The key ``kid`` prepared for ``alg``, or ``None`` if there is no such
        usable key (unknown after a refresh, refresh not allowed yet or failed,
        or a key whose type or stated ``alg`` does not fit ``alg``)."""
        expired = self._fetched_at is not None and self._clock() - self._fetched_at >= self._ttl
        if kid not in self._keys or expired:
            await self._refresh()
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

    async def _refresh(self) -> None:
        async with self._lock:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._min_interval:
                return  # rate-limited, or another request just refreshed
            self._last_attempt = now
            try:
                keys = await asyncio.to_thread(fetch_jwks, self._url, self._opener, self._timeout)
            except JwksError as exc:
                _log.warning(
                    "jwtValidation: JWKS refresh failed, keeping %d cached key(s): %s",
                    len(self._keys),
                    exc,
                )
                return
            self._keys = {
                key["kid"]: key
                for key in keys
                if isinstance(key.get("kid"), str) and key.get("use", "sig") == "sig"
            }
            self._prepared = {}
            self._fetched_at = now


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


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ParameterError("caFile", f"cannot load CA certificates: {exc}") from exc


class Policy:
    """Validates bearer tokens; see the module docstring for the contract.

    ``clock`` (monotonic seconds) only paces JWKS refreshes; token times are
    checked against the wall clock.
    """

    def __init__(
        self, params: Mapping[str, Any], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        url = str(params["jwksUrl"])
        if not url.startswith("https://"):  # the schema checks too; never fetch over HTTP
            raise ParameterError("jwksUrl", "must be HTTPS")
        self._algorithms = tuple(params.get("algorithms", ("RS256", "ES256")))
        for index, alg in enumerate(self._algorithms):
            if alg not in ALLOWED_ALGORITHMS:
                raise ParameterError(f"algorithms[{index}]", f"{alg!r} is not allowed")
        self._issuer = str(params["issuer"])
        self._audiences = [str(aud) for aud in params["audiences"]]
        self._header = str(params.get("header", "authorization")).lower()
        self._prefix = str(params.get("prefix", "Bearer ")).lower()
        self._leeway = parse_duration(params.get("clockSkew", "30s"))
        self._jwks = JwksCache(
            url,
            context=_ssl_context(params.get("caFile")),
            timeout=parse_duration(params.get("fetchTimeout", "5s")),
            min_refresh_interval=parse_duration(params.get("minRefreshInterval", "30s")),
            ttl=parse_duration(params.get("jwksCacheTtl", "5m")),
            clock=clock,
        )
        self._prefix_headers = str(params.get("headerPrefix", "x-jwt-")).lower()
        self._claim_headers: list[tuple[str, str]] = []
        for index, claim in enumerate(params.get("claimHeaders", ())):
            if _TOKEN.fullmatch(self._prefix_headers + claim) is None:
                raise ParameterError(f"claimHeaders[{index}]", f"{claim!r} cannot name a header")
            self._claim_headers.append((claim, self._prefix_headers + claim.lower()))

    def _token(self, ctx: RequestContext) -> str | None:
        value = ctx.headers.get(self._header, "")
        if value[: len(self._prefix)].lower() != self._prefix:
            return None
        return value[len(self._prefix) :].strip() or None

    def _claim_header_changes(
        self, ctx: RequestContext, claims: Mapping[str, Any]
    ) -> RequestModifications:
        set_headers: dict[str, str] = {}
        for claim, header in self._claim_headers:
            if claim not in claims:
                continue
            value = claims[claim]
            text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            if _FORBIDDEN_IN_VALUE.search(text):
                _log.info("jwtValidation: claim %r not forwarded: CR, LF or NUL in value", claim)
                continue
            set_headers[header] = text
        spoofable = tuple(
            name
            for name in ctx.headers
            if name.startswith(self._prefix_headers) and name not in set_headers
        )
        return RequestModifications(set_headers=set_headers, remove_headers=spoofable)

    async def on_request(
        self, ctx: RequestContext
    ) -> RequestModifications | ImmediateResponse | None:
        """Claim-header changes for a valid token (claims in metadata), else a 401
        response; ``None`` when a valid token needs no header change."""
        token = self._token(ctx)
        if token is None:
            return _unauthorized(None)
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
        ctx.metadata["jwt.sub"] = claims.get("sub")
        ctx.metadata["jwt.claims"] = claims
        changes = self._claim_header_changes(ctx, claims)
        return changes if changes.set_headers or changes.remove_headers else None
