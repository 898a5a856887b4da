"""The engine the benchmark measures: every policy of the default manifest, the real CLI.

``python -m tools.bench.engine_main --config FILE --listen HOST:PORT --workers N`` is
:func:`engine.main.main` with a registry of ``manifests/policy-manifest.yaml``'s policies,
loaded exactly as the builder's generated registry loads them (``engine.registry.load_policy``
on each folder; see ``tests/e2e/test_samples.py``). Running the builder instead would nest a
Bazel call inside ``bazel run`` and add minutes; the request path is the same code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

import yaml

from engine.main import main as engine_main
from engine.registry import PolicyRegistry, load_policy

__all__ = ["MANIFEST", "manifest_registry", "run"]

MANIFEST: Final = Path(__file__).resolve().parents[2] / "manifests" / "policy-manifest.yaml"


def manifest_registry(manifest: Path = MANIFEST) -> PolicyRegistry:
    """Every policy ``manifest`` lists, loaded from its folder."""
    entries = yaml.safe_load(manifest.read_text())["policies"]
    return PolicyRegistry(load_policy((manifest.parent / e["uri"]).resolve()) for e in entries)


def run(argv: list[str]) -> int:
    return engine_main(argv, registry=manifest_registry())


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
