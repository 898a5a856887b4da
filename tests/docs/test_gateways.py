"""docs/operators/gateways.md gives the route-name patterns the tests use."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.route_names import ENVOY_GATEWAY_PATTERN, ISTIO_PATTERN

DOC = Path(__file__).resolve().parents[2] / "docs" / "operators" / "gateways.md"


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param(ENVOY_GATEWAY_PATTERN, id="envoy-gateway"),
        pytest.param(ISTIO_PATTERN, id="istio"),
    ],
)
def test_the_documented_patterns_are_the_tested_ones(pattern):
    assert f"--route-name-pattern '{pattern}'" in DOC.read_text()
