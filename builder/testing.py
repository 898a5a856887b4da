"""Test helpers for the builder: write policy folders and manifests on disk.

Every builder test (unit and end-to-end) makes its inputs with these, so a test
states only what differs from a valid policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["POLICY_BUILD", "policy_code", "write_manifest", "write_policy"]

POLICY_BUILD = 'load("//builder:defs.bzl", "policy_library")\n\npolicy_library()\n'


def policy_code(header: str = "x-custom", value: str = "yes") -> str:
    """A request-phase policy adding one request header (valid against the contract)."""
    return f'''"""Adds {header}: <value param or {value}> to every request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import RequestContext, RequestModifications


class Policy:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self._value = str(params.get("value", "{value}"))

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return RequestModifications(set_headers={{"{header}": self._value}})
'''


def write_policy(
    folder: Path,
    name: str = "custom",
    version: str = "v1.0.0",
    *,
    phases: Sequence[str] = ("request",),
    definition: Mapping[str, Any] | None = None,
    code: str | None = None,
    build: str | None = POLICY_BUILD,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a valid policy folder (override any part); return ``folder``.

    ``definition`` entries are merged over the default definition (a value of None
    removes the key); ``build=None`` writes no BUILD.bazel, ``code=""`` no policy.py.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": f"{name} {version}: test policy.",
        "phases": list(phases),
        "parameters": {"value": {"type": "string", "description": "header value"}},
        "examples": [
            {"description": "default", "parameters": {}, "valid": True},
            {"description": "bad type", "parameters": {"value": 1}, "valid": False},
        ],
    }
    for key, value in (definition or {}).items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (folder / "policy-definition.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    if code != "":
        (folder / "policy.py").write_text(code if code is not None else policy_code())
    if build is not None:
        (folder / "BUILD.bazel").write_text(build)
    for relative, text in (extra_files or {}).items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return folder


def write_manifest(path: Path, policies: Sequence[Mapping[str, Any]], **top: Any) -> Path:
    """Write a manifest listing ``policies`` (``schemaVersion: 1`` unless overridden)."""
    data: dict[str, Any] = {"schemaVersion": 1, **top, "policies": [dict(p) for p in policies]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
