"""The policy definitions of one built engine, as a JSON file the control plane loads.

The builder writes ``<engine>_definitions.json`` next to the registry and the build
metadata (``builder/private/gen_registry.py`` calls :func:`definitions_document`), so a
control plane validates against exactly what that engine contains: names, versions,
parameter schemas, and which parameters are ``secret`` (the definitions are carried as
written, marks included, so the control plane never shows those values; see
:mod:`engine.secrets`). Format (``schemaVersion`` 1)::

    {"schemaVersion": 1,
     "buildInfo": {...the engine's build metadata...},
     "policies": [{"name": "jwtValidation", "version": "v1.0.0", "contentHash": "sha256:...",
                   "definition": {...policy-definition.yaml as parsed...}}, ...]}

:func:`load_validation_registry` turns it into a :class:`~engine.registry.PolicyRegistry`
whose entries have the real definitions (parsed by :func:`engine.definition.parse_definition`,
so schemas mean exactly what they mean in the engine) but no policy code: the factory only
records the parameters. :func:`engine.config.load_config` on that registry therefore runs
everything the engine checks before construction (structure, names, versions, parameter
schemas incl. ``errorMessage``, CEL conditions, durations, statuses). What it cannot run
are the checks inside policy constructors (``ParameterError``): they may need the engine's
host (``jwtValidation`` reads ``caFile`` when constructed), so the engine makes them and
NACKs, and the control plane's status endpoint shows that NACK.

Run as ``<engine> controlplane`` the control plane also has the engine's policy code.
:func:`checking_registry` then keeps the definitions file's entries but gives the
policies whose class says ``pure_constructor = True`` (:mod:`engine.policy`) their real
constructor, so ``load_config`` runs their ``ParameterError`` checks (and ``phases()``,
``bodies()``, ``static_*()``) at submission; every other policy keeps the recording
factory, so nothing on the control plane opens a file or a connection for them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from engine.definition import DEFINITION_FILE, load_definition, load_yaml, parse_definition
from engine.errors import DefinitionError
from engine.registry import PolicyRegistry, RegisteredPolicy

__all__ = [
    "SCHEMA_VERSION",
    "DefinitionsFile",
    "ValidatedParameters",
    "checking_registry",
    "definitions_document",
    "folder_definitions",
    "load_validation_registry",
    "pure_policies",
]

SCHEMA_VERSION: Final = 1


def definitions_document(
    policies: Iterable[tuple[str, str, str, Mapping[str, Any]]], build_info: Mapping[str, str]
) -> dict[str, Any]:
    """The definitions file content: ``policies`` are (name, version, content hash,
    parsed definition), written sorted so the file is reproducible."""
    rows = sorted(policies, key=lambda row: (row[0], row[1]))
    return {
        "schemaVersion": SCHEMA_VERSION,
        "buildInfo": dict(build_info),
        "policies": [
            {"name": n, "version": v, "contentHash": h, "definition": dict(d)}
            for n, v, h, d in rows
        ],
    }


def folder_definitions(
    folders: Iterable[Path], hashes: Mapping[Path, str] | None = None
) -> list[tuple[str, str, str, Mapping[str, Any]]]:
    """(name, version, content hash, parsed definition) of each policy folder, for
    :func:`definitions_document`. Each definition is validated first
    (:class:`DefinitionError` otherwise)."""
    rows: list[tuple[str, str, str, Mapping[str, Any]]] = []
    for folder in folders:
        path = folder / DEFINITION_FILE
        definition = load_definition(path)
        raw = load_yaml(path.read_text("utf-8"))
        digest = (hashes or {}).get(folder, "")
        rows.append((definition.name, definition.version, digest, raw))
    return rows


class ValidatedParameters(Mapping[str, Any]):
    """What the control plane's registry "constructs": the validated parameters only."""

    __slots__ = ("_params",)

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._params = MappingProxyType(dict(params))

    def __getitem__(self, key: str) -> Any:
        return self._params[key]

    def __iter__(self) -> Any:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


class DefinitionsFile:
    """A loaded definitions file: the validation registry and the engine's build info."""

    def __init__(self, path: Path, registry: PolicyRegistry, build_info: Mapping[str, str]):
        self.path = path
        self.registry = registry
        self.build_info = MappingProxyType(dict(build_info))


def load_validation_registry(path: str | Path) -> DefinitionsFile:
    """Read ``path``; raises :class:`DefinitionError` naming the file and the entry."""
    source = str(path)
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise DefinitionError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise DefinitionError(f"{source}: not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("schemaVersion") != SCHEMA_VERSION:
        raise DefinitionError(f"{source}: expected a definitions file with schemaVersion 1")
    entries: list[RegisteredPolicy] = []
    errors: list[str] = []
    for index, row in enumerate(data.get("policies") or []):
        where = f"{source}: policies[{index}]"
        if not isinstance(row, dict) or not isinstance(row.get("definition"), dict):
            errors.append(f"{where}: must be a mapping with a 'definition'")
            continue
        try:
            definition = parse_definition(row["definition"], f"{where} ({row.get('name')})")
        except DefinitionError as exc:
            errors.extend(exc.errors)
            continue
        entries.append(
            RegisteredPolicy(
                definition=definition,
                factory=ValidatedParameters,
                content_hash=str(row.get("contentHash", "")),
            )
        )
    if errors:
        raise DefinitionError("\n".join(errors), errors)
    info = data.get("buildInfo") or {}
    return DefinitionsFile(
        Path(path), PolicyRegistry(entries), {str(k): str(v) for k, v in info.items()}
    )


def checking_registry(definitions: PolicyRegistry, policies: PolicyRegistry) -> PolicyRegistry:
    """``definitions`` (:func:`load_validation_registry`'s) with the real constructor of
    each policy of ``policies`` (the same engine's code) whose class declares
    ``pure_constructor = True``; the others keep :class:`ValidatedParameters`.

    Both come from one build; a policy missing from ``policies``, or with another content
    hash, is a :class:`DefinitionError` (a mixed-up binary must not check with other code).
    """
    entries: list[RegisteredPolicy] = []
    errors: list[str] = []
    for entry in definitions:
        key = (entry.name, entry.version)
        if key not in policies:
            errors.append(f"policy {entry.name} {entry.version}: definition without code")
            continue
        code = policies.get(*key)
        if entry.content_hash and code.content_hash and entry.content_hash != code.content_hash:
            errors.append(
                f"policy {entry.name} {entry.version}: content hash {code.content_hash} of "
                f"the code differs from the definitions file's {entry.content_hash}"
            )
            continue
        pure = getattr(code.factory, "pure_constructor", False) is True
        entries.append(
            RegisteredPolicy(
                definition=entry.definition,
                factory=code.factory if pure else _recording(code.factory),
                content_hash=entry.content_hash,
            )
        )
    if errors:
        raise DefinitionError("\n".join(errors), errors)
    return PolicyRegistry(entries)


def _recording(code: Any) -> type[ValidatedParameters]:
    """:class:`ValidatedParameters`, with the code's pure ``explain(params)`` hook when it has
    one (engine/policy.py): ``POST /explain`` can then describe a policy the control plane
    does not construct."""
    hook = getattr(code, "explain", None)
    if hook is None:
        return ValidatedParameters
    return type(
        "ValidatedParameters",
        (ValidatedParameters,),
        {"__slots__": (), "explain": staticmethod(hook)},
    )


def pure_policies(registry: PolicyRegistry) -> list[str]:
    """``name version`` of each policy of ``registry`` constructed by the control plane."""
    return [
        f"{p.name} {p.version}"
        for p in registry
        if not (isinstance(p.factory, type) and issubclass(p.factory, ValidatedParameters))
    ]
