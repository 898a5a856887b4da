"""Bytecode for the image, compiled at build time (the image's root file system is read-only).

Python writes ``__pycache__/*.pyc`` on first import; in the image it cannot (read-only
root, non-root user), so without these every start would compile every module again
(measured: ``import engine.main`` 3.4 s without, see README). The files are
*unchecked-hash* pycs (PEP 552): they carry a hash of the source instead of its mtime, are
byte-for-byte reproducible, and Python uses them without looking at the source's mtime.

The build's Python compiles for the image's: both must be 3.11 (same magic number for every
3.11 release, so 3.11.7 at build time serves bookworm's 3.11.2).
"""

from __future__ import annotations

import importlib.util
import sys
from importlib._bootstrap_external import _code_to_hash_pyc  # type: ignore[attr-defined]
from pathlib import PurePosixPath

__all__ = ["IMAGE_PYTHON", "compile_pyc", "pyc_path"]

IMAGE_PYTHON = (3, 11)
_TAG = "cpython-311"


def _check_python() -> None:
    if sys.version_info[:2] != IMAGE_PYTHON or sys.implementation.cache_tag != _TAG:
        raise SystemExit(
            f"pyc: the build runs Python {sys.version.split()[0]}; the image's bytecode needs "
            "Python 3.11 (put python3.11 first on PATH)"
        )


def pyc_path(path: str) -> str:
    """``a/b/c.py`` -> ``a/b/__pycache__/c.cpython-311.pyc``."""
    pure = PurePosixPath(path)
    return str(pure.parent / "__pycache__" / f"{pure.stem}.{_TAG}.pyc")


def compile_pyc(source: bytes, image_path: str) -> bytes | None:
    """The unchecked-hash pyc of ``source`` (at ``image_path`` in the image), or None if it
    does not compile (e.g. Python 2 test data shipped as ``.py``: Python would not import it
    either)."""
    _check_python()
    try:
        code = compile(source, image_path, "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError):
        return None
    data: bytes = _code_to_hash_pyc(code, importlib.util.source_hash(source), checked=False)
    return data
