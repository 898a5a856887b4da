"""The one way the route table changes: one change at a time, validated off the event loop.

:class:`~controlplane.table.RouteTable` validates on the calling thread, which is the
event loop that also serves ADS: a big submission (a whole table of hundreds of routes,
validated twice) stalled every engine stream while it ran. :class:`TableWriter` runs the
validation and encoding (the table's ``_prepare``) and the deep copy in a worker thread
and only the publish (one assignment and a notify) on the loop.

Changes are serialized by a lock, so the document a change was built from is still the
table's current document when it is published (no lost update between the admin API and
the watched config). Every writer of the table (admin API, watched config) must go
through the same :class:`TableWriter`.

(This belongs in ``RouteTable`` itself; it lives here because another change was editing
``table.py`` at the same time.)
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2

from controlplane.table import RouteTable, TableVersion
from engine.config import canonical_json
from engine.secrets import restore_document

__all__ = ["Change", "TableWriter", "changed_keys"]


@dataclass(frozen=True, slots=True)
class Change:
    """What one change did: ``errors`` (empty: accepted), the versions around it, and
    the route keys (plus ``unknownRoute``) whose content differs between them."""

    errors: list[str]
    before: TableVersion
    after: TableVersion
    keys: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return not self.errors


Edit = Callable[[Mapping[str, Any]], Any]
"""Builds the candidate document from the current one (runs in the worker thread; must
not mutate its argument)."""


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Route keys added, removed or changed from ``old`` to ``new`` (sorted), then
    ``unknownRoute`` if it changed."""
    old_routes, new_routes = old.get("routes", {}), new.get("routes", {})
    keys = sorted(
        key
        for key in set(old_routes) | set(new_routes)
        if key not in old_routes
        or key not in new_routes
        or canonical_json(old_routes[key]) != canonical_json(new_routes[key])
    )
    if canonical_json(old.get("unknownRoute")) != canonical_json(new.get("unknownRoute")):
        keys.append("unknownRoute")
    return keys


_Prepared = tuple[
    dict[str, Any] | None, tuple[any_pb2.Any, ...], tuple[any_pb2.Any, ...], list[str], list[str]
]


class TableWriter:
    """Serialized, off-loop changes to ``table``. Use from the table's event loop."""

    def __init__(self, table: RouteTable) -> None:
        self.table = table
        self._lock = asyncio.Lock()

    async def change(self, edit: Edit, source: str, *, keep_redacted: bool = False) -> Change:
        """Apply ``edit`` if the resulting table is valid; else return its errors and
        change nothing. Validation runs in a worker thread.

        With ``keep_redacted`` (one route read from the admin API and sent back) a
        redaction marker in a secret field keeps the value the same route and entry have
        now (:func:`engine.secrets.restore_document`); otherwise a marker is an error."""
        async with self._lock:
            before = self.table.current
            document, resources, settings, errors, keys = await asyncio.to_thread(
                self._prepare, edit, before, source, keep_redacted
            )
            if errors or document is None:
                return Change(errors, before, before)
            await self.table._publish(document, resources, settings, source)
            return Change([], before, self.table.current, keys)

    async def replace(self, document: Any, source: str) -> Change:
        """Make ``document`` (``{"routes": {...}}``, maybe ``unknownRoute``) the table."""
        return await self.change(lambda _: document, source)

    def _prepare(
        self, edit: Edit, before: TableVersion, source: str, keep_redacted: bool
    ) -> _Prepared:
        document = edit(before.document)
        if not isinstance(document, Mapping) or not isinstance(document.get("routes"), Mapping):
            return None, (), (), self.table.check_shape(document), []
        if keep_redacted:
            document, errors = restore_document(document, before.document, self.table.registry)
            if errors:
                return None, (), (), errors, []
        resources, settings, errors = self.table._prepare(document, source)
        if errors:
            return None, (), (), errors, []
        copied = copy.deepcopy(dict(document))
        return copied, resources, settings, [], changed_keys(before.document, copied)
