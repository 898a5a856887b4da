"""builder.manifest: reading and schema-checking policy-manifest.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from builder.errors import ManifestError
from builder.manifest import load_manifest
from builder.testing import write_manifest


def test_relative_absolute_and_file_uris_resolve(tmp_path: Path) -> None:
    manifest = load_manifest(
        write_manifest(
            tmp_path / "m" / "policy-manifest.yaml",
            [
                {"name": "a", "uri": "../policies/a/v1.0.0"},
                {"name": "b", "version": "v2.0.0", "uri": "/opt/p/b"},
                {"name": "c", "uri": "file:///opt/p/c"},
            ],
        )
    )
    assert [e.folder for e in manifest.entries] == [
        tmp_path / "policies" / "a" / "v1.0.0",
        Path("/opt/p/b"),
        Path("/opt/p/c"),
    ]
    assert [e.version for e in manifest.entries] == [None, "v2.0.0", None]
    assert manifest.entries[1].label == "policies[1] (b v2.0.0)"


@pytest.mark.parametrize(
    ("policies", "top", "expected"),
    [
        ([{"uri": "x"}], {}, "policies[0]: name: is required"),
        ([{"name": "a"}], {}, "policies[0] (a): uri: is required"),
        (
            [{"name": "a", "uri": "x", "version": "1.0"}],
            {},
            "policies[0] (a): version: '1.0' does not match",
        ),
        (
            [{"name": "a", "uri": "x", "url": "y"}],
            {},
            "policies[0] (a): Additional properties are not allowed ('url' was unexpected)",
        ),
        ([{"name": "a", "uri": ""}], {}, "policies[0] (a): uri: '' should be non-empty"),
        ([{"name": "a", "uri": "x"}], {"schemaVersion": 2}, "schemaVersion: must be 1 (got 2)"),
        ([], {}, "policies: [] should be non-empty"),
    ],
    ids=[
        "name-missing",
        "uri-missing",
        "bad-version",
        "unknown-field",
        "empty-uri",
        "schema-version",
        "no-policies",
    ],
)
def test_schema_errors_name_file_entry_and_field(
    tmp_path: Path, policies: list[dict[str, Any]], top: dict[str, Any], expected: str
) -> None:
    path = write_manifest(tmp_path / "policy-manifest.yaml", policies, **top)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.errors == (f"{path}: {expected}",) or any(
        line.startswith(f"{path}: {expected}") for line in info.value.errors
    ), info.value.errors


def test_every_error_reported_at_once(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "policy-manifest.yaml", [{"uri": "x"}, {"name": "b"}], schemaVersion=0
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert len(info.value.errors) == 3, info.value.errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "expected a mapping at the top level, got empty"),
        ("- a\n", "expected a mapping at the top level, got list"),
        ("schemaVersion: 1\nschemaVersion: 1\n", "found duplicate key 'schemaVersion'"),
        ("policies: [\n", "line "),
    ],
    ids=["empty", "list", "duplicate-key", "yaml-syntax"],
)
def test_unreadable_documents(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "policy-manifest.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.errors[0].startswith(f"{path}: ")
    assert expected in info.value.errors[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "nope.yaml")
