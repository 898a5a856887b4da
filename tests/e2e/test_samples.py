"""The sample policies' scenarios through a real Envoy (issue: sample policies).

The engine holds every policy of manifests/policy-manifest.yaml, loaded exactly as
the builder's generated registry loads them (engine.registry.load_policy on each
folder), and serves manifests/demo-config.yaml. The scenarios are the demo's
(tools/demo/demo.py): the README's main job shows what these tests prove.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from engine.registry import PolicyRegistry, load_policy
from tests.e2e.harness import EngineThread
from tools.demo.demo import SCENARIOS, DemoStack, Scenario, run_scenario

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[2]


def manifest_registry() -> PolicyRegistry:
    manifest = REPO / "manifests" / "policy-manifest.yaml"
    entries = yaml.safe_load(manifest.read_text())["policies"]
    return PolicyRegistry(load_policy((manifest.parent / e["uri"]).resolve()) for e in entries)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    registry = manifest_registry()
    workdir = tmp_path_factory.mktemp("samples")
    with DemoStack(workdir, lambda config: EngineThread(registry, config), REPO) as running:
        yield running


def test_registry_has_every_sample_including_both_versions() -> None:
    registry = manifest_registry()
    assert registry.versions("jwtValidation") == ["v1.0.0", "v2.0.0"]
    assert registry.versions("rateLimit") == ["v1.0.0", "v2.0.0"]
    assert len(registry) == 8


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(stack: DemoStack, scenario: Scenario) -> None:
    assert run_scenario(stack, scenario) == []
