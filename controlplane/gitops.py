"""The watched configuration: a YAML file, or a directory of them, that replaces the table.

GitOps style: a deployment tool (git-sync, a ConfigMap mount, ``mv``) swaps the file or
the directory's contents atomically; this module notices and hands the new document to
:meth:`~controlplane.table.RouteTable.replace`, which validates it whole.

* A file holds ``routes: {...}``, the engine's config format.
* A directory: every ``*.yaml`` / ``*.yml`` in it (not hidden, not recursive; symlinks
  followed, so a Kubernetes ConfigMap's ``..data`` swap works; a dangling one is an
  error naming it, not a file gone) holds ``routes:``; the
  union is the table. A route key defined in two files is an error naming both.

Change detection polls ``stat`` of every file (cheap). A change is loaded only once it
has *settled* (:mod:`engine.settle`, the engine's rule for its config file): every file
of the set (path, inode, size, mtime and sha256) unchanged for ``settle`` seconds
(``--settle``, default 2), then read once more. A file rewritten in place with a pause
(``cp``, ``>``, an in-place ``git checkout``) is therefore not loaded half-written (its
prefix was often valid: a route without its ``jwtValidation``), and a route moved from
one file of a directory to another is loaded once both files are written, in either
order, never in between (neither "defined twice" nor "gone"), as long as the writer
finishes within ``settle``. Replacing files atomically (temp file + ``mv``, a ConfigMap's
``..data`` swap) remains the supported way. Reading, parsing and validating run in
worker threads, never on the event loop that serves ADS.
An invalid document is logged with every error; the table keeps its last good state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from controlplane.table import RouteTable
from engine.definition import YamlError, load_yaml
from engine.settle import DEFAULT_SETTLE, SettledFiles

__all__ = ["ConfigWatcher", "parse_config", "read_config"]

log: Final = logging.getLogger("controlplane.gitops")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml")
            and not p.name.startswith(".")
            # A dangling symlink is listed (reading it is then an error naming it): if it
            # were skipped, its routes would be pushed as deleted.
            and (p.is_file() or (p.is_symlink() and not p.exists()))
        )
    return [path]


def _unreadable(path: Path, exc: OSError) -> str:
    return f"{exc.filename or path}: cannot read: {exc.strerror or exc}"


def read_config(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The document at ``path`` (file or directory) and the problems reading it, read
    now (no settling; tools and tests)."""
    contents: dict[Path, bytes] = {}
    errors: list[str] = []
    for file in _files(path):
        try:
            contents[file] = file.read_bytes()
        except OSError as exc:
            errors.append(f"{file}: cannot read: {exc.strerror or exc}")
    document, more = parse_config(path, contents)
    return document, errors + more


def parse_config(path: Path, contents: Mapping[Path, bytes]) -> tuple[dict[str, Any], list[str]]:
    """The document made of ``contents`` (each file of ``path`` -> its bytes, in listing
    order) and its problems, each naming the file."""
    errors: list[str] = []
    routes: dict[str, Any] = {}
    owner: dict[str, Path] = {}
    top: dict[str, Path] = {}
    settings: dict[str, Any] = {}
    if path.is_dir() and not contents:
        errors.append(f"{path}: no *.yaml or *.yml files")
    for file, data in contents.items():
        try:
            document = load_yaml(data)
        except YamlError as exc:
            errors.append(f"{file}: YAML syntax error: {exc}")
            continue
        if not isinstance(document, dict) or not isinstance(document.get("routes"), dict):
            errors.append(f"{file}: expected a mapping with 'routes' (route key -> route)")
            continue
        errors += [
            f"{file}: unknown field {key!r}"
            for key in document
            if key not in ("routes", "unknownRoute")
        ]
        if "unknownRoute" in document:
            if "unknownRoute" in top:
                errors.append(f"{file}: unknownRoute: also set in {top['unknownRoute']}")
            else:
                top["unknownRoute"] = file
                settings["unknownRoute"] = document["unknownRoute"]
        for key, spec in document["routes"].items():
            if key in owner:
                errors.append(f"{file}: routes[{key}]: also defined in {owner[key]}")
                continue
            owner[key] = file
            routes[key] = spec
    return {**settings, "routes": routes}, errors


class ConfigWatcher:
    """Polls ``path``; feeds each new, settled, valid document to the table."""

    def __init__(
        self,
        path: str | Path,
        table: RouteTable,
        poll_interval: float = 0.5,
        *,
        settle: float = DEFAULT_SETTLE,
    ) -> None:
        self.path = Path(path)
        self.table = table
        self.poll_interval = poll_interval
        self.settle = settle
        self._files = SettledFiles(lambda: _files(self.path), settle)
        self._unreadable = False
        self.last_errors: list[str] = []

    async def load_initial(self, limit: float | None = None) -> list[str]:
        """Load ``path`` once it has settled (at once if nothing in it changed in the
        last ``settle`` seconds); returns its errors (empty: the table holds it).
        Gives up after ``limit`` (default ``10 * settle + 5``) seconds of changes."""
        limit = 10 * self.settle + 5 if limit is None else limit
        deadline = asyncio.get_running_loop().time() + limit
        said = False
        while True:
            try:
                contents = await asyncio.to_thread(self._files.poll)
            except OSError as exc:
                return self._report([_unreadable(self.path, exc)], True)
            if contents is not None:
                return await self._load(contents)
            if asyncio.get_running_loop().time() > deadline:
                return self._report([f"{self.path}: still changing after {limit:g}s"], True)
            if not said:
                said = True
                log.info(
                    "config %s was modified in the last %gs; loading it once unchanged",
                    self.path,
                    self.settle,
                )
            await asyncio.sleep(min(self.poll_interval, max(self.settle / 4, 0.01)))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.check_once()

    async def check_once(self) -> list[str]:
        """One poll: loads the watched config if it changed and has settled."""
        waiting = self._files.waiting
        try:
            contents = await asyncio.to_thread(self._files.poll)
        except OSError as exc:
            errors = [_unreadable(self.path, exc)]
            report = self._report(errors, not self._unreadable)
            self._unreadable = True
            return report
        self._unreadable = False
        if contents is None:
            if self._files.waiting and not waiting and self.settle > 0:
                log.info(
                    "config %s changed; loading it once unchanged for %gs "
                    "(write it atomically, temp file + rename, to skip nothing)",
                    self.path,
                    self.settle,
                )
            return self.last_errors
        return await self._load(contents)

    async def _load(self, contents: dict[Path, bytes]) -> list[str]:
        document, errors = await asyncio.to_thread(parse_config, self.path, contents)
        if not errors:
            change = await self.table.replace(document, f"config {self.path}")
            errors = change.errors
        if not errors:
            log.info(
                "config %s: %d routes, version %s",
                self.path,
                len(document["routes"]),
                self.table.current.version,
            )
        return self._report(errors, True)

    def _report(self, errors: list[str], changed: bool) -> list[str]:
        if errors and (changed or errors != self.last_errors):
            log.error(
                "config %s rejected (%d error(s)); keeping version %s",
                self.path,
                len(errors),
                self.table.current.version,
            )
            for line in errors:
                log.error("%s", line)
        self.last_errors = errors
        return errors
