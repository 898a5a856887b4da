"""The route table: route key -> chain spec, the one state the control plane serves.

Every change (one route submitted or deleted through the admin API, or the whole table
replaced by the watched config) builds the complete candidate document and validates it
with :func:`engine.config.load_config` against the engine's definitions. A rejected
change returns every error and leaves the table, and therefore every engine, untouched:
nothing invalid is ever pushed. Changes run one at a time, validated in a worker thread
(:meth:`RouteTable.change`): the admin API and the watched config go through it.

An accepted change gets a new version: ``<generation>-<hash>``, where ``generation``
counts accepted changes of this process and ``hash`` is the first 12 hex digits of the
sha256 of the canonical document, so "which config does this engine run" can be compared
across control plane restarts (same hash, same config). The encoded resources
(one ``RouteChain`` per route, packed in ``Any``) are built once per version.

Secrets (parameters whose definition marks them ``secret``, :mod:`engine.secrets`) stay
inside: :meth:`RouteTable.routes`, what the admin API shows, returns the specs redacted,
and :meth:`RouteTable.scrub` removes the secrets of recent versions from text that comes
from elsewhere (an engine's NACK). The raw document (``TableVersion.document``) is what
engines get; nothing that outputs configuration may read it. A submitted document may
carry the redaction marker in a secret field (a spec read from the admin API and sent
back): :meth:`RouteTable.put_route` (and :meth:`RouteTable.change` with
``keep_redacted=True``) keep that field's current value, see
:func:`engine.secrets.restore_document`; everywhere else the marker is an error naming
the field.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2

from engine.config import canonical_json, load_config
from engine.errors import ConfigError
from engine.registry import PolicyRegistry
from engine.secrets import document_secrets, redact_document, restore_document, scrub
from engine.xds.resources import decode_resources, decode_settings, encode_route, encode_settings

__all__ = ["Change", "Edit", "RouteTable", "TableVersion", "changed_keys"]

_SECRET_VERSIONS = 16
"""How many versions' secrets :meth:`RouteTable.scrub` knows: an engine's NACK may be
about a version a few changes old."""


@dataclass(frozen=True, slots=True)
class TableVersion:
    """One accepted state: the document, its version and its encoded resources.

    ``document`` holds the secrets (it is what engines get): show
    :meth:`RouteTable.routes` instead, never this."""

    version: str
    generation: int
    document: Mapping[str, Any]
    resources: tuple[any_pb2.Any, ...]
    source: str
    settings: tuple[any_pb2.Any, ...] = ()
    """The EngineSettings resource (``unknownRoute``), or none for the defaults."""
    secrets: frozenset[str] = frozenset()
    """The secret strings of ``document`` (see :func:`engine.secrets.document_secrets`)."""


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
"""Builds the candidate document from the current one (runs in a worker thread; must
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


class RouteTable:
    """The versioned, always-valid route table. Change it only from its event loop,
    through :meth:`change` (or :meth:`replace`, :meth:`put_route`, :meth:`delete_route`).
    """

    def __init__(self, registry: PolicyRegistry) -> None:
        self.registry = registry
        self._generation = 0
        self._recent_secrets: collections.deque[frozenset[str]] = collections.deque(
            maxlen=_SECRET_VERSIONS
        )
        self._current = self._make({"routes": {}}, (), "<empty>")
        self._changed = asyncio.Condition()
        self._writing = asyncio.Lock()

    @property
    def current(self) -> TableVersion:
        return self._current

    def routes(self) -> dict[str, Any]:
        """A copy of the current route specs, every secret parameter redacted: what
        may be shown (the admin API's ``GET /routes``)."""
        shown = redact_document(self._current.document, self.registry)
        return dict(shown["routes"])

    def _raw_routes(self) -> dict[str, Any]:
        """A copy of the current route specs with their secrets: never to be output."""
        return copy.deepcopy(dict(self._current.document["routes"]))

    def scrub(self, text: str) -> str:
        """``text`` without the secret values of the current and recent versions (for
        text the control plane did not write, such as an engine's NACK)."""
        known: set[str] = set()
        for secrets in self._recent_secrets:
            known |= secrets
        return scrub(text, known)

    def check(self, document: Mapping[str, Any], source: str) -> list[str]:
        """Every error ``document`` has (empty: valid). Pure: nothing changes."""
        return self._prepare(document, source)[2]

    def _prepare(
        self, document: Mapping[str, Any], source: str
    ) -> tuple[tuple[any_pb2.Any, ...], tuple[any_pb2.Any, ...], list[str]]:
        """Validate ``document``, encode it, and validate what engines will decode.

        The second validation runs on the decoded resources, exactly what an engine
        sees, so a value the protobuf ``Struct`` cannot carry faithfully (a YAML date,
        an integer beyond 2**53) is caught here and not on the engines.

        A redaction marker left in a secret field is an error here, whoever calls: the
        marker is a valid string to the schema, and an apiKey key "<redacted>" would let
        in anyone who sends that. Callers that keep current values (``put_route``,
        ``change(keep_redacted=True)``) restore them before calling this.
        """
        _, markers = restore_document(document, None, self.registry)
        if markers:
            return (), (), markers
        try:
            load_config(document, source=source, registry=self.registry)
        except ConfigError as exc:
            return (), (), list(exc.errors)
        settings: tuple[any_pb2.Any, ...] = ()
        message = encode_settings(document)
        if message is not None:
            packed_settings = any_pb2.Any()
            packed_settings.Pack(message)
            settings = (packed_settings,)
        resources: list[any_pb2.Any] = []
        errors: list[str] = []
        for key, spec in sorted(document["routes"].items()):
            packed = any_pb2.Any()
            try:
                packed.Pack(encode_route(key, spec))
            except (TypeError, ValueError) as exc:
                # The converter's words may quote a value.
                shown = scrub(str(exc), document_secrets(document, self.registry))
                errors.append(f"routes[{key}]: cannot be sent as a RouteChain: {shown}")
                continue
            resources.append(packed)
        if errors:
            return (), (), errors
        decoded, problems = decode_resources(resources)
        fields, more = decode_settings(settings)
        decoded.update(fields)
        problems += more
        try:
            load_config(decoded, source=f"{source} (as sent)", registry=self.registry)
        except ConfigError as exc:
            problems += exc.errors
        return tuple(resources), settings, problems

    async def change(self, edit: Edit, source: str, *, keep_redacted: bool = False) -> Change:
        """Apply ``edit`` if the resulting table is valid; else return its errors and
        change nothing.

        Changes run one at a time (a lock), so the document a change was built from is
        still the current one when it is published: no lost update between the admin API
        and the watched config. Validation, encoding and the copy run in a worker thread
        and only the publish (an assignment and a notify) on the loop, so a big
        submission does not stall the ADS streams served by the same loop.

        With ``keep_redacted`` (one route read from the admin API and sent back) a
        redaction marker in a secret field keeps the value the same route and entry have
        now (:func:`engine.secrets.restore_document`); otherwise a marker is an error.
        """
        async with self._writing:
            before = self._current
            document, resources, settings, errors, keys = await asyncio.to_thread(
                self._prepare_change, edit, before, source, keep_redacted
            )
            if errors or document is None:
                return Change(errors, before, before)
            await self._publish(document, resources, settings, source)
            return Change([], before, self._current, keys)

    def _prepare_change(
        self, edit: Edit, before: TableVersion, source: str, keep_redacted: bool
    ) -> _Prepared:
        document = edit(before.document)
        if not isinstance(document, Mapping) or not isinstance(document.get("routes"), Mapping):
            return None, (), (), self.check_shape(document), []
        if keep_redacted:
            document, errors = restore_document(document, before.document, self.registry)
            if errors:
                return None, (), (), errors, []
        resources, settings, errors = self._prepare(document, source)
        if errors:
            return None, (), (), errors, []
        copied = copy.deepcopy(dict(document))
        return copied, resources, settings, [], changed_keys(before.document, copied)

    async def replace(self, document: Any, source: str) -> Change:
        """Make ``document`` (``{"routes": {...}}``, maybe ``unknownRoute``) the table.
        It must stand on its own: a redaction marker in it is an error."""
        return await self.change(lambda _: document, source)

    def check_shape(self, document: Any) -> list[str]:
        """Errors of a document that is not even ``{"routes": {...}}`` (load_config's)."""
        try:
            load_config(document, source="<submitted>", registry=self.registry)
        except ConfigError as exc:
            return list(exc.errors)
        return ["routes: must be a mapping of route key -> route"]

    async def put_route(self, key: str, spec: Any, source: str) -> Change:
        """Submit or replace route ``key``; the whole resulting table is validated.

        A redaction marker in a secret field of ``spec`` keeps that field's current value
        (``GET /routes/<key>``, change, ``PUT`` works without knowing the secrets)."""

        def put(document: Mapping[str, Any]) -> dict[str, Any]:
            return {**document, "routes": {**document["routes"], key: spec}}

        return await self.change(put, source, keep_redacted=True)

    async def delete_route(self, key: str, source: str) -> Change | None:
        """Remove route ``key``; ``None`` if there is no such route."""
        if key not in self._current.document["routes"]:
            return None

        def delete(document: Mapping[str, Any]) -> dict[str, Any]:
            routes = {k: v for k, v in document["routes"].items() if k != key}
            return {**document, "routes": routes}

        return await self.change(delete, source)

    async def wait_newer(self, generation: int) -> TableVersion:
        """Return as soon as the table's generation differs from ``generation``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._current.generation != generation)
            return self._current

    async def _publish(
        self,
        document: dict[str, Any],
        resources: tuple[any_pb2.Any, ...],
        settings: tuple[any_pb2.Any, ...],
        source: str,
    ) -> None:
        if canonical_json(document) == canonical_json(self._current.document):
            return  # same content: no new version, nothing to push
        self._generation += 1
        self._current = self._make(document, resources, source, settings)
        async with self._changed:
            self._changed.notify_all()

    def _make(
        self,
        document: dict[str, Any],
        resources: tuple[any_pb2.Any, ...],
        source: str,
        settings: tuple[any_pb2.Any, ...] = (),
    ) -> TableVersion:
        digest = hashlib.sha256(canonical_json(document).encode()).hexdigest()[:12]
        secrets = document_secrets(document, self.registry)
        self._recent_secrets.append(secrets)
        return TableVersion(
            version=f"{self._generation}-{digest}",
            generation=self._generation,
            document=document,
            resources=resources,
            source=source,
            settings=settings,
            secrets=secrets,
        )
