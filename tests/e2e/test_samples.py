"""The sample policies' scenarios through a real Envoy (issue: sample policies).

The engine holds every policy of manifests/policy-manifest.yaml, loaded exactly as
the builder's generated registry loads them (engine.registry.load_policy on each
folder), and serves manifests/demo-config.yaml. The scenarios are the demo's
(tools/demo/demo.py): the README's main job shows what these tests prove.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from engine.registry import PolicyRegistry, load_policy
from policies.rateLimit.testing import REDIS_SERVER, running_redis
from tests.e2e.harness import EngineThread
from tools.demo.demo import SCENARIOS, DemoStack, Scenario, curl_lines, run_scenario

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
    assert len(registry) == 11


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(stack: DemoStack, scenario: Scenario) -> None:
    assert run_scenario(stack, scenario) == []


@contextlib.contextmanager
def redis_stack(tmp_path: Path, *, busy_at_start: float = 0.0) -> Iterator[DemoStack]:
    """A fresh demo stack whose private route limits through a fresh Redis.
    ``busy_at_start``: Redis blocks (``DEBUG SLEEP``) for that many seconds from just
    before the stack starts, as on a busy machine: the engine's first decisions run out
    of the route's 50 ms ``backendTimeout``."""
    registry = manifest_registry()
    with running_redis(tmp_path) as redis:
        sleeper = threading.Thread(
            target=redis.command,
            args=("DEBUG", "SLEEP", str(busy_at_start)),
            kwargs={"timeout": busy_at_start + 5},
        )
        if busy_at_start:
            sleeper.start()
        try:
            with DemoStack(
                tmp_path, lambda config: EngineThread(registry, config), REPO, redis=redis
            ) as stack:
                yield stack
        finally:
            if busy_at_start:
                sleeper.join()


@pytest.mark.skipif(not os.access(REDIS_SERVER, os.X_OK), reason="no redis-server")
@pytest.mark.parametrize(
    "busy_at_start",
    [pytest.param(0.0, id="idle-redis"), pytest.param(3.0, id="redis-busy-at-start")],
)
def test_scenarios_hold_on_the_first_try_with_redis(tmp_path: Path, busy_at_start: float) -> None:
    """Issue 20 item 5: the stack is warm when it is ready (the engine holds its Redis
    connection and decides through Redis in time before any scenario request), so every
    scenario passes on its first run, also when the first decisions timed out."""
    with redis_stack(tmp_path, busy_at_start=busy_at_start) as stack:
        assert stack.redis_clients(), "the engine's Redis connection is opened before ready"
        problems = {s.name: run_scenario(stack, s) for s in SCENARIOS}
    assert problems == {s.name: [] for s in SCENARIOS}


@pytest.mark.skipif(not os.access(REDIS_SERVER, os.X_OK), reason="no redis-server")
@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_printed_lines_hold_on_the_first_try_with_redis(tmp_path: Path) -> None:
    """The demo as a person meets it: every printed curl line, run once with bash,
    returns exactly the printed statuses, the per-user limit's burst and 429 included."""
    with redis_stack(tmp_path) as stack:
        lines = [line for line in curl_lines(stack) if line and not line.startswith("#")]
        tokens = dict(line.split("=", 1) for line in lines if re.fullmatch(r"[A-Z]+=\S+", line))
        problems: list[str] = []
        for line in lines:
            if line.split("=", 1)[0] in tokens:
                continue
            expected = line.rsplit("# -> ", 1)[1].split()
            result = subprocess.run(
                ["bash", "-c", line],
                env={**os.environ, **tokens},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if line.startswith("curl -si"):  # the status line comes first
                got = result.stdout.split()[1:2]
            else:  # a loop printing one status per request
                got = result.stdout.split()
            if got != expected:
                problems.append(f"{line}: got {got}, printed {expected}")
    assert problems == []


def test_config_comments_read_right_once_filled_in() -> None:
    """The demo writes the config with its placeholders filled in; a placeholder in a
    comment would turn that comment into a garbled URL or backend setting."""
    template = (REPO / "manifests" / "demo-config.yaml").read_text()
    comments = [line for line in template.splitlines() if line.lstrip().startswith("#")]
    assert [line for line in comments if "$" in line] == []
