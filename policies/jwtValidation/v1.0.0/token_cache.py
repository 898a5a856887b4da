"""A bounded cache of verified tokens, one per jwtValidation instance.

Contract (the policy relies on each point; see its module docstring):

* Keyed by the SHA-256 of the token's bytes, so an entry stands for exactly those
  bytes (a collision would need a SHA-256 collision) and a long token costs no
  more than 32 bytes of key.
* Only tokens that passed every check are put in: failures are never cached, so a
  flood of junk tokens leaves the cache as it was. (A negative cache would save no
  one: an attacker varies one byte and misses it.)
* An entry holds the signed payload (the JSON bytes the signature covered) and the
  integer ``exp`` / latest of ``iat`` and ``nbf`` as the verifier read them: the
  time claims are checked again on every request (:meth:`Verified.refusal`), and
  each hit decodes a fresh claims object, so no request can change another's.
* An entry is valid only for the JWKS *generation* it was verified under: when
  the key set changes (a key removed, replaced or added), :meth:`get` with the new
  generation drops every entry at once.
* Bounded by :data:`MAX_ENTRIES` entries and :data:`MAX_BYTES` accounted bytes
  (payload plus :data:`ENTRY_OVERHEAD` each), least recently used evicted first;
  tokens longer than :data:`MAX_TOKEN_BYTES` are verified every time, never kept.

Not thread-safe: one instance lives on one event loop (one engine worker).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ENTRY_OVERHEAD",
    "MAX_BYTES",
    "MAX_ENTRIES",
    "MAX_TOKEN_BYTES",
    "TokenCache",
    "Verified",
    "token_key",
]

MAX_ENTRIES: Final = 4096
"""Most tokens one policy instance keeps verified."""
MAX_BYTES: Final = 4 << 20
"""Most accounted bytes one policy instance keeps (4 MiB)."""
MAX_TOKEN_BYTES: Final = 8192
"""Longer tokens are never cached (real ones are 0.5-2 KB)."""
ENTRY_OVERHEAD: Final = 400
"""Bytes accounted per entry besides its payload: key, entry object and the
ordered dict's slot (tracemalloc: ~310 on CPython 3.11 for 20,000 entries)."""


def token_key(token: str) -> bytes:
    """The cache key of ``token``: SHA-256 of its UTF-8 bytes (lone surrogates kept,
    so two different strings never share a key)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class Verified:
    """What one successful verification established about a token."""

    payload: bytes
    """The JSON claims exactly as signed."""
    generation: int
    """The JWKS generation whose key verified the signature."""
    expires: int
    """``int(exp)``, as the verifier compared it."""
    not_before: int | None
    """The latest of ``int(iat)`` and ``int(nbf)`` (``None``: neither present)."""

    def refusal(self, now: float, leeway: float) -> str | None:
        """Why the token is not valid at Unix time ``now`` with ``leeway`` seconds,
        else ``None``: PyJWT's rules and order (iat and nbf, then exp)."""
        if self.not_before is not None and self.not_before > now + leeway:
            return "token not yet valid"
        if self.expires <= now - leeway:
            return "token expired"
        return None


class TokenCache:
    """Verified tokens by :func:`token_key`, least recently used evicted first."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hits = 0
        """Lookups answered from the cache (for tests and profiling)."""
        self._entries: OrderedDict[bytes, Verified] = OrderedDict()
        self._bytes = 0
        self._generation: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Accounted bytes held now (at most :attr:`max_bytes`)."""
        return self._bytes

    def get(self, key: bytes, generation: int) -> Verified | None:
        """The entry for ``key`` if it was verified under JWKS ``generation``. A
        generation other than the one last seen empties the cache first."""
        if generation != self._generation:
            self.clear()
            self._generation = generation
            return None
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def put(self, key: bytes, entry: Verified, token_length: int) -> None:
        """Keep ``entry`` (a token of ``token_length`` characters) unless the token is
        too long or the entry's generation is no longer current; evict to the bounds."""
        size = len(entry.payload) + ENTRY_OVERHEAD
        if token_length > MAX_TOKEN_BYTES or size > self.max_bytes:
            return
        if entry.generation != self._generation:
            if self._generation is not None and entry.generation < self._generation:
                return  # verified under keys that have since been replaced
            self.clear()
            self._generation = entry.generation
        self.discard(key)
        self._entries[key] = entry
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.payload) + ENTRY_OVERHEAD

    def discard(self, key: bytes) -> None:
        """Forget ``key`` (no error if absent)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.payload) + ENTRY_OVERHEAD

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._bytes = 0
