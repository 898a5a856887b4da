"""The watched config directory of the control plane: changes are taken once settled."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.definitions import load_validation_registry
from controlplane.gitops import ConfigWatcher
from controlplane.table import RouteTable, TableVersion
from controlplane.testing import ControlPlane, write_definitions
from engine.registry import PolicyRegistry

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted(p for p in (REPO / "policies").glob("*/v*") if p.is_dir())
SETTLE = 1.0
PAUSE = 0.3  # between the two files' writes: well under SETTLE


def limit(rate: int) -> dict[str, Any]:
    return {
        "policies": [
            {"name": "rateLimit", "version": "v1.0.0", "parameters": {"requestsPerSecond": rate}}
        ]
    }


@pytest.fixture(scope="module")
def definitions(tmp_path_factory: pytest.TempPathFactory) -> PolicyRegistry:
    path = tmp_path_factory.mktemp("defs") / "engine_definitions.json"
    write_definitions(path, SAMPLES, {"target": "//generated/test:engine"})
    return load_validation_registry(path).registry


def swap(path: Path, document: Any) -> None:
    """Replace one file atomically (temp file + rename), as git-sync or ``mv`` do."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(document))
    tmp.replace(path)


@pytest.mark.parametrize("order", ["add-first", "remove-first"])
async def test_route_moved_between_two_files_is_never_duplicate_nor_gone(
    definitions: PolicyRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture, order: str
) -> None:
    config = tmp_path / "routes"
    config.mkdir()
    a, b = config / "a.yaml", config / "b.yaml"
    swap(a, {"routes": {"moved": limit(5), "stay-a": limit(1)}})
    swap(b, {"routes": {"stay-b": limit(2)}})
    plane = ControlPlane(definitions, config, settle=SETTLE)
    await plane.start()
    seen: list[TableVersion] = []

    async def record() -> None:
        generation = plane.table.current.generation
        while True:
            version = await plane.table.wait_newer(generation)
            seen.append(version)
            generation = version.generation

    recorder = asyncio.create_task(record())
    caplog.set_level(logging.INFO, logger="controlplane")
    try:
        first = plane.table.current
        assert set(first.document["routes"]) == {"moved", "stay-a", "stay-b"}
        # The route moves to b.yaml (and changes, so that the move makes a new version).
        writes = [
            (b, {"routes": {"stay-b": limit(2), "moved": limit(6)}}),
            (a, {"routes": {"stay-a": limit(1)}}),
        ]
        if order == "remove-first":
            writes.reverse()
        swap(*writes[0])
        await asyncio.sleep(PAUSE)
        swap(*writes[1])
        await asyncio.wait_for(plane.table.wait_newer(first.generation), 4 * SETTLE + 5)
        await asyncio.sleep(2 * SETTLE)  # nothing else may follow
    finally:
        recorder.cancel()
        await asyncio.gather(recorder, return_exceptions=True)
        assert await plane.stop() == 0
    rejected = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rejected == []  # never "routes[moved]: also defined in ..."
    assert [v.document["routes"] for v in seen] == [
        {"moved": limit(6), "stay-a": limit(1), "stay-b": limit(2)}
    ]  # one new version, the whole move; never one without the route


async def test_a_directory_change_is_announced_once_then_loaded_settled(
    definitions: PolicyRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "routes"
    config.mkdir()
    swap(config / "a.yaml", {"routes": {"a": limit(1)}})
    plane = ControlPlane(definitions, config, settle=0.3)
    await plane.start()
    caplog.set_level(logging.INFO, logger="controlplane.gitops")
    try:
        first = plane.table.current
        swap(config / "a.yaml", {"routes": {"a": limit(2)}})
        await asyncio.wait_for(plane.table.wait_newer(first.generation), 5)
    finally:
        assert await plane.stop() == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("loading it once unchanged for 0.3s" in m for m in messages) == 1
    assert plane.table.current.document["routes"] == {"a": limit(2)}


async def test_a_dangling_symlink_is_an_error_not_a_file_gone(
    definitions: PolicyRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A *.yaml symlink whose target is missing (a target moved, a half-done swap) is a
    # file that cannot be read, not a file that was deleted: dropping its routes would
    # push a table without them (an unknownRoute: allow then opens those paths).
    config = tmp_path / "routes"
    config.mkdir()
    target = tmp_path / "secure.yaml"
    target.write_text(yaml.safe_dump({"routes": {"secure": limit(5)}}))
    swap(config / "a.yaml", {"routes": {"public": limit(1)}})
    (config / "b.yaml").symlink_to(target)
    table = RouteTable(definitions)
    watcher = ConfigWatcher(config, table, settle=0)
    assert await watcher.load_initial() == []
    before = table.current
    assert set(before.document["routes"]) == {"public", "secure"}
    target.rename(tmp_path / "moved.yaml")
    errors = await watcher.check_once()
    assert errors == [f"{config / 'b.yaml'}: cannot read: No such file or directory"]
    assert table.current is before
    assert f"{config / 'b.yaml'}: cannot read" in caplog.text
    (tmp_path / "moved.yaml").rename(target)
    await watcher.check_once()
    assert table.current is before  # the same content again: nothing new to push
    swap(config / "a.yaml", {"routes": {"public": limit(2)}})
    assert await watcher.check_once() == []
    assert set(table.current.document["routes"]) == {"public", "secure"}
    assert table.current.generation == before.generation + 1
