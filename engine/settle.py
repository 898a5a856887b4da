"""The settle rule for watched files: hand content over only once it has stopped changing.

A file written *in place* (``cp``, ``>``, an editor, an in-place ``git checkout``) is seen
half-written by any reader, and a prefix of a valid config is often itself valid (a route
missing its ``jwtValidation``). :class:`SettledFiles` watches a set of files (one file,
or every file a directory listing names) and returns their content only after the whole
set has stayed the same, by (path, inode, size, mtime_ns) of every file and the sha256
of every file's bytes, across polls spanning ``settle`` seconds; it is then read once
more and handed over only if nothing moved meanwhile.

This is the rule :class:`engine.store.FileConfigSource` applies to the engine's config
file, extended to a set of files: the set is one unit, so a route moved from one file of
a directory to another is handed over only once both files have been written (if the
writer finishes within ``settle`` seconds), never in between (where the route would be
in both files, or in neither).

A writer that pauses for longer than ``settle`` in the middle of an in-place write can
still be read mid-write: replace files atomically (temp file + ``rename``).

Pure blocking file I/O: call :meth:`SettledFiles.poll` from a worker thread
(``asyncio.to_thread``), never on an event loop. Not thread-safe: one poller at a time.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["DEFAULT_SETTLE", "MAX_FILE_BYTES", "FileSetState", "SettledFiles", "checked_stat"]

DEFAULT_SETTLE: Final = 2.0
"""Seconds a changed file (set) must stay unchanged before it is handed over."""

MAX_FILE_BYTES: Final = 64 << 20
"""Largest watched file that is read (the xDS client's message limit, 64 MiB)."""


def checked_stat(path: str | Path) -> os.stat_result:
    """``os.stat(path)``, raising :class:`OSError` for a file that must not be read: one
    that is not a regular file (a FIFO blocks its reader for good, ``/dev/zero`` never
    ends) or is larger than :data:`MAX_FILE_BYTES` (read whole, it could exhaust memory).
    """
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    if st.st_size > MAX_FILE_BYTES:
        raise OSError(
            errno.EFBIG, f"{st.st_size} bytes, over the limit of {MAX_FILE_BYTES}", str(path)
        )
    return st


FileSetState = tuple[tuple[str, int, int, int], ...]
"""(path, st_ino, st_mtime_ns, st_size) of every file, in listing order."""


@dataclass(frozen=True, slots=True)
class _Candidate:
    state: FileSetState
    digest: str
    seen: float  # clock reading of the first poll that saw this content


class SettledFiles:
    """Hands over the content of ``list_files()`` once it has settled.

    ``list_files`` returns the paths to watch (raise :class:`OSError` when the watched
    path itself is unreadable). ``settle=0`` hands a change over at the poll that sees
    it. ``clock`` measures ``settle`` between polls (tests pass a fake); ``wall_clock``
    is compared with file mtimes on the first poll only.
    """

    def __init__(
        self,
        list_files: Callable[[], list[Path]],
        settle: float = DEFAULT_SETTLE,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if settle < 0:
            raise ValueError("settle must be >= 0")
        self.list_files = list_files
        self.settle = settle
        self._clock = clock
        self._wall_clock = wall_clock
        self._state: FileSetState | None = None  # of the content last handed over
        self._digest = ""
        self._candidate: _Candidate | None = None

    @property
    def waiting(self) -> bool:
        """True while a change has been seen and is waiting to settle."""
        return self._candidate is not None

    def forget(self) -> None:
        """Forget what was handed over: the next poll treats the content as new."""
        self._state, self._digest, self._candidate = None, "", None

    def accept(self, contents: Mapping[Path, bytes]) -> None:
        """Record ``contents`` (read by the caller) as handed over: later polls report
        only content that differs from it."""
        self._state, self._digest, self._candidate = None, _digest(contents), None

    def take(self) -> dict[Path, bytes]:
        """Read the files now, without settling, and record that content as handed over
        (start-up reads of small files). Raises :class:`OSError`."""
        state, contents = self._read()
        self._candidate = None
        self._state, self._digest = state, _digest(contents)
        return contents

    def poll(self) -> dict[Path, bytes] | None:
        """The content of every file, if it changed since last handed over and has now
        settled; else None (unchanged, or still settling). Raises :class:`OSError` when
        the watched files cannot be listed or read (the caller reports it; the next poll
        starts over)."""
        try:
            return self._poll()
        except OSError:
            self._candidate = None
            self._state = None
            raise

    def _poll(self) -> dict[Path, bytes] | None:
        state = self._stat()
        if state == self._state and self._candidate is None:
            return None
        candidate = self._candidate
        if candidate is None or candidate.state != state:
            state, contents = self._read()
            digest = _digest(contents)
            if digest == self._digest:  # touched or replaced, same content
                self._state, self._candidate = state, None
                return None
            first = not self._digest and candidate is None  # nothing handed over yet
            if candidate is None or candidate.digest != digest:
                candidate = _Candidate(state, digest, self._clock())
            else:  # same bytes under a new state (rewritten identically): keep waiting
                candidate = _Candidate(state, digest, candidate.seen)
            self._candidate = candidate
            if first and self._old_enough(state):
                pass  # nothing was written in the last `settle` seconds: take it now
            elif self.settle > 0:
                return None
        elif self._clock() - candidate.seen < self.settle:
            return None
        # Settled: read once more and hand over only if nothing moved meanwhile.
        state, contents = self._read()
        digest = _digest(contents)
        if (state, digest) != (candidate.state, candidate.digest):
            self._candidate = _Candidate(state, digest, self._clock())
            return None
        self._candidate = None
        self._state, self._digest = state, digest
        return contents

    def _old_enough(self, state: FileSetState) -> bool:
        newest = max((row[2] for row in state), default=0) / 1e9
        return self._wall_clock() - newest >= self.settle

    def _stat(self) -> FileSetState:
        rows = []
        for path in self.list_files():
            st = checked_stat(path)
            rows.append((str(path), st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(rows)

    def _read(self) -> tuple[FileSetState, dict[Path, bytes]]:
        """Content and the state it was read in; re-read if anything moved meanwhile."""
        for _ in range(3):
            before = self._stat()
            contents = {Path(row[0]): Path(row[0]).read_bytes() for row in before}
            after = self._stat()
            if after == before:
                return before, contents
        return after, contents  # still moving: the settle check catches it


def _digest(contents: Mapping[Path, bytes]) -> str:
    h = hashlib.sha256()
    for path, data in contents.items():
        h.update(str(path).encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()
