"""apiKey v1.0.0: authenticate requests by API key.

Contract:

* The key is read from the header ``name`` (``in: header``, the default) or the
  first query parameter ``name`` (``in: query``). An absent or empty key is
  answered ``401``; a key that matches no configured key ``403``; both carry a
  JSON body ``{"error": ..., "message": ...}``; the 401 also carries
  ``WWW-Authenticate: ApiKey in="header", name="x-api-key"`` (or the configured
  location), since every 401 needs a challenge.
* Configured keys are plain text or ``sha256:<hex>``. At config time every key is
  reduced to its SHA-256 digest; the presented key is hashed once and compared
  with *every* digest with :func:`hmac.compare_digest`, without stopping at a
  match, so neither the timing nor the number of comparisons reveals which key
  (or how much of one) matched. Two entries for the same key are rejected, since
  the consumer would be ambiguous.
* On success ``ctx.metadata[metadataKey]`` holds the consumer id, and with
  ``stripKey`` (default) the key header is removed, or the key query parameter
  dropped from the path, so the secret never reaches the upstream.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import unquote_plus

from engine.policy import (
    ImmediateResponse,
    ParameterError,
    RequestContext,
    RequestModifications,
)

__all__ = ["Policy"]

_HASH_PREFIX: Final = "sha256:"
_HEX_DIGEST: Final = re.compile(r"[0-9A-Fa-f]{64}")
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _json_error(
    status: int, error: str, message: str, challenge: str | None = None
) -> ImmediateResponse:
    headers = {"content-type": "application/json"}
    if challenge is not None:
        headers["www-authenticate"] = challenge
    body = json.dumps({"error": error, "message": message}).encode()
    return ImmediateResponse(status=status, headers=headers, body=body)


def _digest_of(index: int, key: str) -> bytes:
    """The SHA-256 digest a configured key stands for (ParameterError if malformed)."""
    if key.startswith(_HASH_PREFIX):
        hex_digest = key[len(_HASH_PREFIX) :]
        if _HEX_DIGEST.fullmatch(hex_digest) is None:
            raise ParameterError(f"keys[{index}].key", "sha256: must be followed by 64 hex digits")
        return bytes.fromhex(hex_digest)
    return hashlib.sha256(key.encode()).digest()


def _split_query(path: str) -> tuple[str, list[str]]:
    base, _, query = path.partition("?")
    return base, [part for part in query.split("&") if part] if query else []


class Policy:
    """Checks the presented API key; see the module docstring for the contract."""

    # Constructing reads nothing from the host: the control plane may run it too.
    pure_constructor = True

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """What this configuration requires; the keys themselves never (they are secret)."""
        in_query = params["in"] == "query"
        name = str(params["name"])
        keys = params.get("keys") or ()
        return {
            "requires": f"an API key in the {'query parameter' if in_query else 'header'} "
            f"{name if in_query else name.lower()}",
            "rejects": "401 without a key, 403 with a key that is not configured",
            "keys": len(keys),
            "consumers": sorted({str(k.get("consumer")) for k in keys}),
            "writesMetadata": [str(params["metadataKey"])],
            "stripsKey": bool(params["stripKey"]),
        }

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._in_query = params["in"] == "query"
        name = str(params["name"])
        # The schema pattern is anchored with `$`, which Python lets match before a
        # final newline; fullmatch closes that gap.
        if _TOKEN.fullmatch(name) is None:
            raise ParameterError("name", f"{name!r} is not a valid header or parameter name")
        self._name = name if self._in_query else name.lower()
        self._metadata_key = str(params["metadataKey"])
        self._strip = bool(params["stripKey"])
        # RFC 9110 requires a challenge with every 401; API keys have no registered
        # scheme, so this names where the key goes (the name is a token: no quoting issue).
        self._challenge = (
            f'ApiKey in="{"query" if self._in_query else "header"}", name="{self._name}"'
        )
        entries: Sequence[Mapping[str, str]] = params["keys"]
        keys: list[tuple[bytes, str]] = []
        seen: dict[bytes, int] = {}
        for index, entry in enumerate(entries):
            digest = _digest_of(index, entry["key"])
            if digest in seen:
                raise ParameterError(
                    f"keys[{index}].key", f"is the same key as keys[{seen[digest]}].key"
                )
            seen[digest] = index
            keys.append((digest, entry["consumer"]))
        self._keys = tuple(keys)

    def _presented(self, ctx: RequestContext) -> str:
        if not self._in_query:
            return ctx.headers.get(self._name, "").strip()
        for part in _split_query(ctx.path)[1]:
            raw_name, _, raw_value = part.partition("=")
            if unquote_plus(raw_name) == self._name:
                return unquote_plus(raw_value)
        return ""

    def _match(self, presented: str) -> str | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        consumer: str | None = None
        for candidate, owner in self._keys:
            # No early exit: every configured key is compared on every request.
            if hmac.compare_digest(digest, candidate):
                consumer = owner
        return consumer

    def _without_key(self, ctx: RequestContext) -> RequestModifications:
        if not self._in_query:
            return RequestModifications(remove_headers=(self._name,))
        base, parts = _split_query(ctx.path)
        kept = [p for p in parts if unquote_plus(p.partition("=")[0]) != self._name]
        return RequestModifications(path=f"{base}?{'&'.join(kept)}" if kept else base)

    def on_request(self, ctx: RequestContext) -> RequestModifications | ImmediateResponse | None:
        """401 without a key, 403 with an unknown key, else record the consumer."""
        presented = self._presented(ctx)
        if not presented:
            where = "query parameter" if self._in_query else "header"
            return _json_error(
                401, "unauthorized", f"missing API key ({where} {self._name})", self._challenge
            )
        consumer = self._match(presented)
        if consumer is None:
            return _json_error(403, "forbidden", "invalid API key")
        ctx.metadata[self._metadata_key] = consumer
        return self._without_key(ctx) if self._strip else None
