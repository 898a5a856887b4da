"""Errors raised by the builder.

Hierarchy::

    BuilderError
    ├── ManifestError     the manifest cannot be read or fails its schema
    ├── ValidationError   one or more policies fail validation (folder, definition, code,
    │                     name/version mismatch, name + version conflict)
    └── BazelError        a Bazel command failed (a failing policy test is not one: the
                          builder reports those like validation errors, builder.policy_tests)

``ManifestError`` and ``ValidationError`` carry every problem found (``errors``),
one line each, naming the manifest entry, the file and the field, so that the whole
report is printed at once.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BazelError", "BuilderError", "ManifestError", "ValidationError"]


class BuilderError(Exception):
    """Base class of every error the builder raises on purpose."""


class _ReportError(BuilderError):
    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors: tuple[str, ...] = tuple(errors)


class ManifestError(_ReportError):
    """The manifest is unreadable or invalid; ``errors`` lists every problem."""


class ValidationError(_ReportError):
    """At least one policy is invalid; ``errors`` lists every problem."""


class BazelError(BuilderError):
    """A Bazel command failed (the message says which and its exit code)."""
