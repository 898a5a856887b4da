"""The current configuration and the sources that replace it.

:class:`ConfigStore` holds one immutable :class:`~engine.chain.Snapshot`.
Copy-on-write: a source builds a complete new snapshot and publishes it with a
single reference assignment; a request reads ``store.current`` once and keeps
that snapshot to its end, so in-flight requests finish on the configuration
they started with. No lock is needed: everything runs on one event loop and the
swap is one attribute store.

A *config source* feeds the store. :class:`FileConfigSource` polls a YAML file
(development); an xDS stream (production, next milestone) implements the same
:class:`ConfigSource` protocol and publishes the same way. An invalid update is
logged and dropped; the engine keeps serving the last good snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol, runtime_checkable

from engine.chain import Snapshot
from engine.config import load_config
from engine.errors import ConfigError
from engine.registry import PolicyRegistry

__all__ = [
    "EMPTY_SNAPSHOT",
    "ConfigSource",
    "ConfigStore",
    "FileConfigSource",
    "Listener",
]

logger: Final = logging.getLogger("engine.store")

EMPTY_SNAPSHOT: Final = Snapshot(routes=MappingProxyType({}), source="<empty>", version=0)

Listener = Callable[[Snapshot], None]
"""Called synchronously after each publish with the new snapshot."""


class ConfigStore:
    """Holds the current snapshot; starts with :data:`EMPTY_SNAPSHOT` (no routes)."""

    __slots__ = ("_current", "_last_source", "_listeners")

    def __init__(self, initial: Snapshot = EMPTY_SNAPSHOT) -> None:
        self._current = initial
        self._last_source = ""
        self._listeners: list[Listener] = []

    @property
    def current(self) -> Snapshot:
        """The snapshot to use for a new request. Read it once per request."""
        return self._current

    @property
    def last_source(self) -> str:
        """Name of the source that published :attr:`current` (empty before any publish)."""
        return self._last_source

    def publish(self, snapshot: Snapshot, source: str) -> None:
        """Make ``snapshot`` current; ``source`` names the publisher (e.g. ``file``)."""
        self._current = snapshot
        self._last_source = source
        for listener in tuple(self._listeners):
            try:
                listener(snapshot)
            except Exception:  # one broken listener must not stop the others
                logger.exception("config listener %r failed", listener)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Register ``listener``; returns a function that unregisters it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove


@runtime_checkable
class ConfigSource(Protocol):
    """Anything that validates configuration and publishes snapshots to a store.

    ``load_initial`` returns once the first valid snapshot is published (or
    raises :class:`ConfigError`); ``run`` keeps the store up to date until
    cancelled and must never raise for bad input: it logs and keeps the old
    snapshot.
    """

    def load_initial(self) -> Snapshot: ...

    async def run(self) -> None: ...


_FileState = tuple[int, int, int]  # (st_ino, st_mtime_ns, st_size)


class FileConfigSource:
    """Publishes the configuration in ``path``, re-reading it when it changes.

    Change detection is a cheap ``stat`` per poll; the file is re-read only when
    (inode, mtime_ns, size) changed, and re-validated only when the content's
    sha256 differs from the last one seen (valid or not), so an unchanged or
    still-broken file is not re-logged on every poll.
    """

    name: Final = "file"

    def __init__(
        self,
        path: str | Path,
        registry: PolicyRegistry,
        store: ConfigStore,
        poll_interval: float = 0.25,
    ) -> None:
        self.path = Path(path)
        self.registry = registry
        self.store = store
        self.poll_interval = poll_interval
        self._state: _FileState | None = None
        self._digest = ""
        self._unreadable = False

    def load_initial(self) -> Snapshot:
        """Load and publish the file; raises :class:`ConfigError` if unreadable or invalid."""
        try:
            state = self._stat()
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(str(self.path), [f"cannot read: {exc.strerror or exc}"]) from exc
        snapshot = self._load(data)
        self._state, self._digest = state, hashlib.sha256(data).hexdigest()
        self._publish(snapshot)
        return snapshot

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.poll_interval)
            self.check_once()

    def check_once(self) -> bool:
        """One poll: reload if the file changed. Returns True if a snapshot was published."""
        try:
            state = self._stat()
            if state == self._state:
                return False
            data = self.path.read_bytes()
        except OSError as exc:
            if not self._unreadable:  # log the transition, not every poll
                logger.error(
                    "config file %s unreadable (%s); keeping version %d",
                    self.path,
                    exc.strerror or exc,
                    self.store.current.version,
                )
            self._unreadable = True
            self._state = None
            return False
        self._unreadable = False
        self._state = state
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            snapshot = self._load(data)
        except ConfigError as exc:
            logger.error(
                "config reload from %s rejected (%d error(s)); keeping version %d",
                self.path,
                len(exc.errors),
                self.store.current.version,
            )
            for line in exc.lines():
                logger.error("%s", line)
            return False
        except Exception as exc:  # a loader bug must not end reloads (run() would die)
            logger.error(
                "config reload from %s failed (%s: %s); keeping version %d",
                self.path,
                type(exc).__name__,
                exc,
                self.store.current.version,
                exc_info=exc,
            )
            return False
        self._publish(snapshot)
        logger.info("config reloaded from %s: %d routes", self.path, len(snapshot.routes))
        return True

    def _stat(self) -> _FileState:
        st = os.stat(self.path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self, data: bytes) -> Snapshot:
        return load_config(
            data, source=str(self.path), registry=self.registry, previous=self.store.current
        )

    def _publish(self, snapshot: Snapshot) -> None:
        self.store.publish(snapshot, self.name)
