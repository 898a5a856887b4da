"""The watched configuration: a YAML file, or a directory of them, that replaces the table.

GitOps style: a deployment tool (git-sync, a ConfigMap mount, ``mv``) swaps the file or
the directory's contents atomically; this module notices and hands the new document to
:meth:`~controlplane.table.RouteTable.replace`, which validates it whole.

* A file holds ``routes: {...}``, the engine's config format.
* A directory: every ``*.yaml`` / ``*.yml`` in it (not hidden, not recursive; symlinks
  followed, so a Kubernetes ConfigMap's ``..data`` swap works) holds ``routes:``; the
  union is the table. A route key defined in two files is an error naming both.

Change detection polls ``stat`` of every file (cheap) and re-reads when anything
changed; a document read while it changed under us is read again at the next poll, so
a non-atomic writer can cause a rejected intermediate state but never a mixed one.
An invalid document is logged with every error; the table keeps its last good state.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Final

from controlplane.table import RouteTable
from engine.definition import YamlError, load_yaml

__all__ = ["ConfigWatcher", "read_config"]

log: Final = logging.getLogger("controlplane.gitops")

_Signature = tuple[tuple[str, int, int, int], ...]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
        )
    return [path]


def _signature(path: Path) -> _Signature:
    rows = []
    for file in _files(path):
        st = os.stat(file)
        rows.append((str(file), st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(rows)


def read_config(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The document at ``path`` (file or directory) and the problems reading it."""
    errors: list[str] = []
    routes: dict[str, Any] = {}
    owner: dict[str, Path] = {}
    top: dict[str, Path] = {}
    settings: dict[str, Any] = {}
    files = _files(path)
    if path.is_dir() and not files:
        errors.append(f"{path}: no *.yaml or *.yml files")
    for file in files:
        try:
            document = load_yaml(file.read_bytes())
        except OSError as exc:
            errors.append(f"{file}: cannot read: {exc.strerror or exc}")
            continue
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
    """Polls ``path``; feeds each new valid document to ``table``."""

    def __init__(self, path: str | Path, table: RouteTable, poll_interval: float = 0.5) -> None:
        self.path = Path(path)
        self.table = table
        self.poll_interval = poll_interval
        self._signature: _Signature | None = None
        self.last_errors: list[str] = []

    async def load_initial(self) -> list[str]:
        """Load ``path`` once; returns its errors (empty: the table holds it)."""
        return await self.check_once(force=True)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.check_once()

    async def check_once(self, *, force: bool = False) -> list[str]:
        try:
            before = _signature(self.path)
        except OSError as exc:
            return self._report([f"{self.path}: cannot read: {exc.strerror or exc}"], force)
        if before == self._signature and not force:
            return []
        document, errors = read_config(self.path)
        try:
            if _signature(self.path) != before:
                return []  # changed while we read: read it again at the next poll
        except OSError:
            return []
        self._signature = before
        if not errors:
            errors = await self.table.replace(document, f"config {self.path}")
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
