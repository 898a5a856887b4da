"""Who may use the admin API: bearer tokens from a file, each with a name and a role.

The token file (``--admin-token-file``): one token per line, three fields separated by
whitespace, ``#`` starts a comment line, blank lines are ignored::

    # name       role        token (at least 32 characters: A-Z a-z 0-9 - . _ ~ + / =)
    alice        read-write  2b1e0c4f6a8d4e7f9a0b1c2d3e4f5a6b
    ci-reader    read-only   Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0

* **name**: who, as the audit log shows it (``[A-Za-z0-9][A-Za-z0-9_.@-]*``, unique);
* **role**: ``read-only`` (``GET``, and ``POST /explain``) or ``read-write`` (every method);
* **token**: the secret, sent as ``Authorization: Bearer <token>``; unique.

Several lines make rotation possible: add the new token, move clients, remove the old
line. The file is re-read when it changes (after the settle rule of
:mod:`engine.settle`, so a half-written file is not taken). A file that is invalid at
start-up is a start-up error naming the file and line; one that becomes invalid later
**fails closed**: no token is accepted (every request gets 401) until the file is valid
again, since keeping the old tokens would keep a token the operator meant to revoke.

Token values are never logged, never put in an error message and not kept in memory:
only their SHA-256 digests are, and a presented token's digest is compared with every
digest with :func:`hmac.compare_digest` (no early exit, so timing says nothing about
which token or how much of it matched).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final

from engine.settle import DEFAULT_SETTLE, SettledFiles

__all__ = ["Identity", "Role", "TokenFile", "TokenFileError", "parse_tokens"]

log: Final = logging.getLogger("controlplane.auth")

MIN_TOKEN_LENGTH: Final = 32
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token


class Role(Enum):
    READ_ONLY = "read-only"
    READ_WRITE = "read-write"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: the token's name and role (never the token)."""

    name: str
    role: Role

    @property
    def may_write(self) -> bool:
        return self.role is Role.READ_WRITE


class TokenFileError(Exception):
    """The token file is unreadable or invalid; ``errors`` name the file and line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def parse_tokens(path: Path, data: bytes) -> list[tuple[bytes, Identity]]:
    """(sha256 digest, identity) of every token in ``data``, the content of ``path``.

    Raises :class:`TokenFileError` with every problem (``FILE:LINE: ...``, never the
    token), including a file with no token at all."""
    errors: list[str] = []
    entries: list[tuple[bytes, Identity]] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenFileError([f"{path}: not UTF-8 text"]) from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        fields = line.split()
        if len(fields) != 3:
            errors.append(f"{where}: expected 3 fields 'name role token', got {len(fields)}")
            continue
        name, role_text, token = fields
        if not _NAME.fullmatch(name):
            errors.append(f"{where}: name must match {_NAME.pattern}")
            continue
        try:
            role = Role(role_text)
        except ValueError:
            errors.append(f"{where}: role must be read-only or read-write")
            continue
        if len(token) < MIN_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            errors.append(
                f"{where}: token of {name!r} must be at least {MIN_TOKEN_LENGTH} characters "
                "of A-Z a-z 0-9 - . _ ~ + / (then = padding)"
            )
            continue
        digest = hashlib.sha256(token.encode()).digest()
        if name in names:
            errors.append(f"{where}: name {name!r} also on line {names[name]}")
            continue
        if digest in digests:
            errors.append(f"{where}: token of {name!r} is the same as on line {digests[digest]}")
            continue
        names[name], digests[digest] = number, number
        entries.append((digest, Identity(name, role)))
    if not entries and not errors:
        errors.append(f"{path}: no token (lines 'name role token')")
    if errors:
        raise TokenFileError(errors)
    return entries


class TokenFile:
    """The tokens of one file, kept current by :meth:`run`."""

    def __init__(
        self, path: str | Path, *, settle: float = DEFAULT_SETTLE, poll_interval: float = 0.5
    ) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._files = SettledFiles(lambda: [self.path], settle)
        self._entries: list[tuple[bytes, Identity]] = []
        self._valid = False

    @property
    def names(self) -> list[str]:
        """The names of the tokens accepted now."""
        return [identity.name for _, identity in self._entries]

    def load_initial(self) -> None:
        """Read the file now (blocking; before serving). Raises :class:`TokenFileError`."""
        try:
            data = self._files.take()[self.path]
        except OSError as exc:
            raise TokenFileError([f"{self.path}: cannot read: {exc.strerror or exc}"]) from exc
        self._entries = parse_tokens(self.path, data)
        self._valid = True

    def authenticate(self, authorization: str | None) -> Identity | None:
        """The identity of ``Authorization: Bearer <token>``, or None. Constant time in
        the token's content; compares with every token."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hashlib.sha256(token.strip().encode("utf-8", "replace")).digest()
        found: Identity | None = None
        for digest, identity in self._entries:
            if hmac.compare_digest(digest, presented):
                found = identity
        return found

    async def run(self) -> None:
        """Re-read the file when it changes, until cancelled (never raises)."""
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.check_once()

    async def check_once(self) -> None:
        try:
            data = await asyncio.to_thread(self._files.poll)
        except OSError as exc:
            self._fail([f"{self.path}: cannot read: {exc.strerror or exc}"])
            return
        if data is None:
            return
        try:
            entries = parse_tokens(self.path, data[self.path])
        except TokenFileError as exc:
            self._fail(exc.errors)
            return
        self._entries, self._valid = entries, True
        log.info(
            "token file %s reloaded: %d token(s): %s",
            self.path,
            len(entries),
            ", ".join(f"{i.name} ({i.role.value})" for _, i in entries),
        )

    def _fail(self, errors: list[str]) -> None:
        if self._valid or self._entries:
            log.error(
                "token file %s invalid; accepting NO token until it is fixed (fail closed)",
                self.path,
            )
            for line in errors:
                log.error("%s", line)
        self._entries, self._valid = [], False
