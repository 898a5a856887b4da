"""The current configuration and the sources that replace it.

:class:`ConfigStore` holds one immutable :class:`~engine.chain.Snapshot`.
Copy-on-write: a source builds a complete new snapshot and publishes it with a
single reference assignment; a request reads ``store.current`` once and keeps
that snapshot to its end, so in-flight requests finish on the configuration
they started with. Publishing happens on the serving event loop, so no lock is
needed: the swap is one attribute store.

A *config source* feeds the store. :class:`FileConfigSource` polls a YAML file;
an xDS stream (:mod:`engine.xds`) implements the same :class:`ConfigSource`
protocol and publishes the same way. An invalid update is logged and dropped;
the engine keeps serving the last good snapshot.

Building a snapshot (reading, parsing, validating, constructing policies) runs in
a worker thread, never on the event loop: a 500-route config took 0.8 s per edit
there, during which every request waited. Only the publish runs on the loop.

**Writing the config file.** The supported way is an atomic replace: write a
temporary file in the same directory, then ``mv`` (``rename(2)``) it over the
config; Kubernetes ConfigMap volumes do the equivalent (a ``..data`` symlink
swapped to a new timestamped directory). A file written *in place* (``cp``, many
editors, ``>`` redirection) is seen half-written by any reader, and a prefix of a
valid config is often itself valid (JWT routes simply missing). So a changed file
is loaded only after it has stayed unchanged, by (inode, size, mtime_ns) and
sha256, for ``settle`` seconds of polls (default :data:`DEFAULT_SETTLE`); the
deferral is logged once per change. The rule lives in :mod:`engine.settle`, shared
with the control plane's watched config. A writer that pauses for longer than
``settle`` in the middle of an in-place write can still be read mid-write: write
atomically.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol, runtime_checkable

from engine import metrics
from engine.chain import Snapshot
from engine.config import load_config
from engine.errors import ConfigError
from engine.registry import PolicyRegistry
from engine.settle import DEFAULT_SETTLE, SettledFiles, checked_stat

__all__ = [
    "DEFAULT_SETTLE",
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
        """Make ``snapshot`` current; ``source`` names the publisher (e.g. ``file``).

        Call it on the serving event loop (listeners run there)."""
        self._current = snapshot
        self._last_source = source
        # The publisher's name, not snapshot.source: that one holds paths and xDS
        # versions, and a metric label must not change with every push.
        metrics.config_published(
            snapshot.version,
            source,
            snapshot.content_hash,
            snapshot.routes,
            [(r, p.name, p.version) for r, chain in snapshot.routes.items() for p in chain.policies]
            if metrics.enabled()
            else (),
        )
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

    Each poll is one ``stat`` (following symlinks, so a Kubernetes ``..data`` swap is
    a change). A new (inode, mtime_ns, size) makes the file a *candidate*: it is read
    and hashed, and loaded once polls have seen the same state and content for
    ``settle`` seconds (see the module docstring). Content equal to the last content
    seen (valid or not) is not loaded again, so an unchanged or still-broken file is
    not re-logged on every poll. ``settle=0`` loads a change at the poll that sees it.
    """

    name: Final = "file"

    def __init__(
        self,
        path: str | Path,
        registry: PolicyRegistry,
        store: ConfigStore,
        poll_interval: float = 0.25,
        *,
        settle: float = DEFAULT_SETTLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.registry = registry
        self.store = store
        self.poll_interval = poll_interval
        # `clock` measures `settle` between polls (tests pass a fake).
        self._files = SettledFiles(lambda: [self.path], settle, clock=clock)
        self._unreadable = False

    @property
    def settle(self) -> float:
        """Seconds a change must stay unchanged before it is loaded (settable)."""
        return self._files.settle

    @settle.setter
    def settle(self, seconds: float) -> None:
        self._files.settle = seconds

    # -- start-up -------------------------------------------------------------------------

    def load_initial(self) -> Snapshot:
        """Load and publish the file; raises :class:`ConfigError` if unreadable, invalid,
        or still changing after ``10 * settle`` seconds.

        Blocking (it runs before the server starts). A file modified less than
        ``settle`` seconds ago is re-read after waiting, until two reads ``settle``
        apart agree, so a file being written while the engine starts is not loaded
        half-written.
        """
        deadline = time.monotonic() + 10 * self.settle
        state, data = self._read_or_raise()
        if self.settle > 0 and time.time() - state[1] / 1e9 < self.settle:
            logger.info(
                "config file %s was modified in the last %gs; loading it once unchanged",
                self.path,
                self.settle,
            )
        while self.settle > 0 and time.time() - state[1] / 1e9 < self.settle:
            if time.monotonic() > deadline:
                raise ConfigError(
                    str(self.path), [f"still changing after {10 * self.settle:g}s; not loaded"]
                )
            time.sleep(self.settle)
            again = self._read_or_raise()
            if again == (state, data):
                break  # unchanged for `settle` seconds (whatever the file's clock says)
            state, data = again
        snapshot = self._load(data)
        self._files.accept({self.path: data})
        self._publish(snapshot)
        return snapshot

    def _read_or_raise(self) -> tuple[_FileState, bytes]:
        try:
            return self._read()
        except OSError as exc:
            raise ConfigError(str(self.path), [f"cannot read: {exc.strerror or exc}"]) from exc

    # -- polling --------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled. File work and snapshot building run in a worker thread."""
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.poll()

    async def poll(self) -> bool:
        """One poll, off the event loop; publishes on it. True if a snapshot was published."""
        snapshot = await asyncio.to_thread(self._prepare)
        if snapshot is None:
            return False
        self._published(snapshot)
        return True

    def check_once(self) -> bool:
        """One poll, entirely in the calling thread (tests, tools). Same rules as :meth:`poll`."""
        snapshot = self._prepare()
        if snapshot is None:
            return False
        self._published(snapshot)
        return True

    def _prepare(self) -> Snapshot | None:
        """Everything but the publish: stat, read, settle, validate, build. Never raises."""
        waiting = self._files.waiting
        try:
            contents = self._files.poll()
        except OSError as exc:
            if not self._unreadable:  # log the transition, not every poll
                logger.error(
                    "config file %s unreadable (%s); keeping version %d",
                    self.path,
                    exc.strerror or exc,
                    self.store.current.version,
                )
            self._unreadable = True
            return None
        self._unreadable = False
        if contents is None:
            if self._files.waiting and not waiting and self.settle > 0:  # once per change
                logger.info(
                    "config file %s changed; loading it once unchanged for %gs "
                    "(write it atomically, temp file + rename, to skip nothing)",
                    self.path,
                    self.settle,
                )
            return None
        try:
            return self._load(contents[self.path])
        except ConfigError as exc:
            metrics.config_reload_failed("rejected")
            logger.error(
                "config reload from %s rejected (%d error(s)); keeping version %d",
                self.path,
                len(exc.errors),
                self.store.current.version,
            )
            for line in exc.lines():
                logger.error("%s", line)
        except Exception as exc:  # a loader bug must not end reloads (run() would die)
            metrics.config_reload_failed("failed")
            logger.error(
                "config reload from %s failed (%s: %s); keeping version %d",
                self.path,
                type(exc).__name__,
                exc,
                self.store.current.version,
                exc_info=exc,
            )
        return None

    # -- helpers --------------------------------------------------------------------------

    def _stat(self) -> _FileState:
        st = checked_stat(self.path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> tuple[_FileState, bytes]:
        """Content and the state it was read in; re-read if the file moved meanwhile."""
        for _ in range(3):
            before = self._stat()
            data = self.path.read_bytes()
            if self._stat() == before:
                return before, data
        return self._stat(), data  # still moving: the settle check catches it

    def _load(self, data: bytes) -> Snapshot:
        return load_config(
            data, source=str(self.path), registry=self.registry, previous=self.store.current
        )

    def _published(self, snapshot: Snapshot) -> None:
        self._publish(snapshot)
        logger.info("config reloaded from %s: %d routes", self.path, len(snapshot.routes))

    def _publish(self, snapshot: Snapshot) -> None:
        self.store.publish(snapshot, self.name)
