"""Test-only support: the test policies under ``policies/`` and helpers to load them.

Test policies live here, never in ``engine/``: the engine ships no policies.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from engine.registry import PolicyRegistry, load_policy

__all__ = ["POLICIES_DIR", "policy_folder", "registry_from", "test_policies_dir", "write_policy"]

POLICIES_DIR = Path(__file__).resolve().parent / "policies"


def test_policies_dir() -> Path:
    """The folder holding ``<name>/<version>/`` test policies."""
    return POLICIES_DIR


test_policies_dir.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def policy_folder(name: str, version: str = "v1.0.0") -> Path:
    return POLICIES_DIR / name / version


def registry_from(*folders: str | Path) -> PolicyRegistry:
    """A registry of the given folders; a plain name means that test policy's v1.0.0."""
    paths = [f if isinstance(f, Path) else policy_folder(f) for f in folders]
    return PolicyRegistry(load_policy(path) for path in paths)


def write_policy(
    root: Path,
    name: str,
    version: str = "v1.0.0",
    *,
    definition: str | None = None,
    code: str | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write a policy folder under ``root`` (for tests of loading failures).

    ``definition`` and ``code`` default to a minimal valid request-phase policy;
    ``extra`` adds files (relative name -> text). Text is dedented.
    """
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    if definition is None:
        definition = f"""
            name: {name}
            version: {version}
            description: generated test policy
            phases: [request]
        """
    if code is None:
        code = """
            class Policy:
                def __init__(self, params):
                    self.params = params

                def on_request(self, ctx):
                    return None
        """
    files = {"policy-definition.yaml": definition, "policy.py": code, **(extra or {})}
    for relative, text in files.items():
        (folder / relative).write_text(textwrap.dedent(text).lstrip())
    return folder
