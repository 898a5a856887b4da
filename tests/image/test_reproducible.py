"""Reproducibility: independent builds of the same inputs give the same image digest.

``image`` and ``image_twin`` (tests/image/BUILD.bazel) are built by separate actions from
the same binary and the same labels; ``image_other`` differs in one label and the policy
list. Every byte (layers, config, manifest) must match for the twins and the digest must
differ for the other.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IMAGES = {
    name: Path(os.environ[f"{name.upper()}_DIR"]) for name in ("image", "image_twin", "image_other")
}
DIGESTS = {name: Path(os.environ[f"{name.upper()}_DIGEST"]).read_text().strip() for name in IMAGES}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_inputs_give_the_same_digest() -> None:
    assert DIGESTS["image"] == DIGESTS["image_twin"]


def test_same_inputs_give_byte_identical_layouts() -> None:
    assert _tree(IMAGES["image"]) == _tree(IMAGES["image_twin"])


def test_different_labels_give_a_different_digest() -> None:
    assert DIGESTS["image_other"] != DIGESTS["image"]


@pytest.mark.parametrize("name", sorted(IMAGES), ids=sorted(IMAGES))
def test_digest_file_names_the_manifest(name: str) -> None:
    assert (IMAGES[name] / "blobs" / "sha256" / DIGESTS[name].removeprefix("sha256:")).is_file()
