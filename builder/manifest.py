"""The policy manifest (``policy-manifest.yaml``): which policies an engine contains.

Format (``schemaVersion`` 1)::

    schemaVersion: 1
    policies:
      - name: setHeader            # required: must equal the definition's name
        version: v1.0.0            # optional: when given, must equal the definition's
        uri: ../policies/setHeader/v1.0.0   # required: the policy folder

``uri`` is a path, relative to the manifest's folder or absolute (``file://`` URIs
are accepted too); it may point outside the repository. :func:`load_manifest`
reports every schema violation at once, each naming the file, the entry and the
field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from jsonschema import Draft202012Validator

from builder.errors import ManifestError
from engine.definition import YamlError, format_path, load_yaml

__all__ = [
    "MANIFEST_SCHEMA",
    "SCHEMA_VERSION",
    "Manifest",
    "ManifestEntry",
    "load_manifest",
    "parse_manifest",
]

SCHEMA_VERSION: Final = 1

MANIFEST_SCHEMA: Final[Mapping[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schemaVersion", "policies"],
    "additionalProperties": False,
    "properties": {
        "schemaVersion": {"const": SCHEMA_VERSION},
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "uri"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                    "version": {"type": "string", "pattern": r"^v\d+\.\d+\.\d+$"},
                    "uri": {"type": "string", "minLength": 1},
                },
            },
        },
    },
}
_VALIDATOR: Final = Draft202012Validator(MANIFEST_SCHEMA)


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One ``policies[index]`` entry; ``folder`` is ``uri`` resolved (absolute, normalised)."""

    index: int
    name: str
    version: str | None
    uri: str
    folder: Path

    @property
    def label(self) -> str:
        """How error messages name this entry: ``policies[2] (setHeader v1.0.0)``."""
        version = f" {self.version}" if self.version else ""
        return f"policies[{self.index}] ({self.name}{version})"


@dataclass(frozen=True, slots=True)
class Manifest:
    """A schema-valid manifest; ``path`` is absolute."""

    path: Path
    entries: tuple[ManifestEntry, ...]


def _resolve(uri: str, base: Path) -> Path:
    path = uri.removeprefix("file://")
    # normpath, not resolve(): the folder keeps the name the user gave (symlinks included).
    return Path(os.path.normpath(base / os.path.expanduser(path)))


def _entry_prefix(data: Any, path: Sequence[str | int]) -> str:
    """``policies[1] (name 'x')`` for errors inside an entry, else empty."""
    if len(path) >= 2 and path[0] == "policies" and isinstance(path[1], int):
        entry = data["policies"][path[1]]
        name = entry.get("name") if isinstance(entry, Mapping) else None
        return f"policies[{path[1]}]" + (f" ({name})" if isinstance(name, str) else "")
    return ""


def parse_manifest(data: Any, path: Path) -> Manifest:
    """Validate parsed manifest ``data`` read from ``path``; raise :class:`ManifestError`."""
    source = str(path)
    if not isinstance(data, Mapping):
        kind = "empty" if data is None else type(data).__name__
        raise ManifestError([f"{source}: expected a mapping at the top level, got {kind}"])
    lines: list[tuple[str, str]] = []
    for error in _VALIDATOR.iter_errors(data):
        where = list(error.absolute_path)
        entry = _entry_prefix(data, where)
        field = format_path(where[2:] if entry else where)
        if error.validator == "required" and isinstance(error.instance, Mapping):
            missing = error.message.split("'")[1]
            field = f"{field}.{missing}" if field else missing
            message = "is required"
        elif error.validator == "additionalProperties":
            message = error.message
        elif error.validator == "const":
            message = f"must be {SCHEMA_VERSION} (got {error.instance!r})"
        else:
            message = error.message
        parts = [source, entry, field]
        lines.append((format_path(where), ": ".join(p for p in parts if p) + f": {message}"))
    if lines:
        raise ManifestError([line for _, line in sorted(lines)])
    base = path.parent
    entries = tuple(
        ManifestEntry(
            index=index,
            name=item["name"],
            version=item.get("version"),
            uri=item["uri"],
            folder=_resolve(item["uri"], base),
        )
        for index, item in enumerate(data["policies"])
    )
    return Manifest(path=path, entries=entries)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path`` (made absolute)."""
    path = Path(os.path.abspath(path))
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{path}: cannot read: not UTF-8: {exc}"]) from exc
    try:
        data = load_yaml(text)
    except YamlError as exc:
        raise ManifestError([f"{path}: {exc}"]) from exc
    return parse_manifest(data, path)
