"""Where Debian's prometheus package puts its binaries (the host's, or tools/bazel's root)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

__all__ = ["binary"]


def binary(name: str) -> Path:
    """``promtool`` or ``prometheus`` from PATH or /usr/bin; fails the test loudly (never a
    skip) when it is missing."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
    )
    if found is None:
        pytest.fail(
            f"{name} not found: install Debian's prometheus package (apt-get install -y "
            "prometheus; tools/bazel adds it to its offline root)"
        )
    return Path(found)
