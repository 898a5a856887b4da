"""The content hash of a policy: a deterministic digest of the files shipped with it.

``sha256:`` + SHA-256 of the lines ``<sha256 of file>  <path relative to the folder>``
(``sha256sum`` format), sorted by path. Only file contents and relative paths count:
not timestamps, modes or the folder's location, so a policy copied elsewhere keeps its
hash. Reproduce it in a shell::

    cd policies/setHeader/v1.0.0 && sha256sum policy-definition.yaml policy.py \
        | sort -k2 | sha256sum
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["content_hash"]


def content_hash(files: Iterable[tuple[str, Path]]) -> str:
    """Hash of ``(relative path, file)`` pairs (any order)."""
    lines = []
    for relative, path in sorted(files, key=lambda item: item[0]):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {relative}\n")
    return "sha256:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
