"""The repository's own catalog: the default manifest lists every sample policy, all valid.

These tests read the real source tree (``policies/``, through the resolved test file
path), which Bazel does not track as inputs: their target is tagged ``external`` so
Bazel never serves a cached result.
"""

from __future__ import annotations

from pathlib import Path

from builder.manifest import load_manifest
from builder.validate import validate

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MANIFEST = REPO / "manifests" / "policy-manifest.yaml"


def test_default_manifest_lists_every_sample_policy() -> None:
    manifest = load_manifest(DEFAULT_MANIFEST)
    listed = {(e.name, e.version) for e in manifest.entries}
    on_disk = {(p.parent.name, p.name) for p in (REPO / "policies").glob("*/v*")}
    assert listed == on_disk
    assert all(e.folder.is_dir() for e in manifest.entries)


def test_sample_policies_are_valid() -> None:
    policies = validate(load_manifest(DEFAULT_MANIFEST))
    assert len(policies) == len(list((REPO / "policies").glob("*/v*")))
