"""Builder test options: the ``bazel`` marker (tests that run Bazel themselves)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "bazel: runs `tools/bazel run //builder:build` (slow; needs POLICY_ENGINE_BUILDER_E2E=1)",
    )
