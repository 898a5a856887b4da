"""``POST /explain`` of the admin API: engine/explain.py against the current route table.

The body describes a request (JSON or YAML, at most :data:`MAX_EXPLAIN_BODY` bytes)::

    {"route": "partner", "method": "GET", "path": "/api/x",
     "headers": {"x-env": "dev"}, "metadata": {"apiKey.consumer": "partner-prod"}}

and the answer is the explanation (:func:`engine.explain.explain`) of that request against
the table version named in the ``x-table-version`` response header (and in
``config.version``). A read-only token is enough: nothing changes. Parsing, the
configuration's snapshot (built once per table version, with the control plane's
registry: the policies it constructs are those it checks at submission) and the
explanation run in a worker thread, never on the event loop that serves the engines'
ADS streams. A description that is not valid is 400 naming the field.

What the control plane cannot say: a policy it does not construct (its constructor may
need the engine's host, see :func:`controlplane.definitions.checking_registry`) has no
static action here, and a standalone control plane (no policy code) has no ``explain``
hooks at all; ``<engine> controlplane`` has them for every policy.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from controlplane.table import RouteTable, TableVersion
from engine.chain import Snapshot
from engine.config import load_config
from engine.errors import ConfigError, ExplainError
from engine.explain import ExplainRequest, explain
from engine.yamlsafe import YamlError, load_yaml

__all__ = ["MAX_EXPLAIN_BODY", "TABLE_VERSION_HEADER", "Explainer"]

MAX_EXPLAIN_BODY: Final = 64 * 1024
"""A request description is small: a bigger body is 413 (whatever ``--admin-max-body``)."""

TABLE_VERSION_HEADER: Final = "x-table-version"


class Explainer:
    """Explains requests against ``table``'s current version."""

    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._cached: tuple[str, Snapshot] | None = None

    async def answer(self, body: bytes) -> tuple[int, dict[str, Any], str]:
        """(status, JSON payload, the table version explained against)."""
        current = self._table.current
        status, payload = await asyncio.to_thread(self._work, body, current)
        return status, payload, current.version

    def _work(self, body: bytes, current: TableVersion) -> tuple[int, dict[str, Any]]:
        if not body.strip():
            return 400, {"errors": ['body: empty (send a JSON object such as {"path": "/"})']}
        try:
            request = ExplainRequest.from_json(load_yaml(body))
            result = explain(self._snapshot(current), request, self._table.registry)
        except YamlError as exc:
            return 400, {"errors": [f"body: {exc}"]}
        except ExplainError as exc:
            return 400, {"errors": [str(exc)], "field": exc.field}
        result["config"] = {"version": current.version, "source": current.source}
        return 200, result

    def _snapshot(self, current: TableVersion) -> Snapshot:
        cached = self._cached
        if cached is not None and cached[0] == current.version:
            return cached[1]
        try:
            snapshot = load_config(
                current.document, source=f"table {current.version}", registry=self._table.registry
            )
        except ConfigError as exc:  # the table is always valid: an engine bug if reached
            raise RuntimeError(f"the current table does not load: {exc}") from exc
        self._cached = (current.version, snapshot)
        return snapshot
