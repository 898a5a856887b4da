"""Tests of engine.store: publishing snapshots and hot-reloading a config file."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from engine.chain import Snapshot
from engine.errors import ConfigError
from engine.registry import PolicyRegistry
from engine.store import EMPTY_SNAPSHOT, ConfigSource, ConfigStore, FileConfigSource
from tests.support import registry_from

ONE_ROUTE = """
routes:
  public:
    policies:
      - {name: addHeader, version: v1.0.0, parameters: {header: x-a, value: "1"}}
"""
TWO_ROUTES = ONE_ROUTE + "  private:\n    policies: []\n"
INVALID = """
routes:
  public:
    policies:
      - {name: addHeader, version: v9.0.0}
      - {name: addHeader, version: v1.0.0, priority: 1, parameters: {header: x-a, value: "1"}}
"""


@pytest.fixture(scope="module")
def registry() -> PolicyRegistry:
    return registry_from("addHeader")


def write(path: Path, text: str) -> None:
    """Write and move mtime forward explicitly: two writes within one coarse kernel
    clock tick could otherwise share an mtime (and a size)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    stamp = max(path.stat().st_mtime_ns, before + 1_000_000)
    os.utime(path, ns=(stamp, stamp))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    write(path, ONE_ROUTE)
    return path


@pytest.fixture
def source(config_file: Path, registry: PolicyRegistry) -> FileConfigSource:
    return FileConfigSource(config_file, registry, ConfigStore(), poll_interval=0.01)


# --------------------------------------------------------------------------- store


def test_store_starts_empty_and_publishes() -> None:
    store = ConfigStore()
    assert store.current is EMPTY_SNAPSHOT
    assert store.current.chain_for("any") is None
    snapshot = Snapshot(routes={}, source="x", version=7)
    store.publish(snapshot, "xds")
    assert store.current is snapshot
    assert store.last_source == "xds"


def test_listeners(caplog: pytest.LogCaptureFixture) -> None:
    store = ConfigStore()
    seen: list[int] = []

    def broken(snapshot: Snapshot) -> None:
        raise RuntimeError("listener bug")

    store.add_listener(broken)
    remove = store.add_listener(lambda s: seen.append(s.version))
    with caplog.at_level(logging.ERROR, logger="engine.store"):
        store.publish(Snapshot(routes={}, version=1), "test")
    remove()
    remove()  # idempotent
    store.publish(Snapshot(routes={}, version=2), "test")
    assert seen == [1]
    assert [r.getMessage().startswith("config listener") for r in caplog.records] == [True, True]


def test_file_source_is_a_config_source(source: FileConfigSource) -> None:
    assert isinstance(source, ConfigSource)


# --------------------------------------------------------------------------- file source


def test_load_initial_publishes(source: FileConfigSource, config_file: Path) -> None:
    snapshot = source.load_initial()
    assert source.store.current is snapshot
    assert source.store.last_source == "file"
    assert (snapshot.version, snapshot.source, list(snapshot.routes)) == (
        1,
        str(config_file),
        ["public"],
    )
    assert source.check_once() is False  # nothing changed


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read: No such file or directory"),
        (INVALID, "routes[public].policies[0] addHeader v9.0.0: policy 'addHeader' version"),
    ],
    ids=["missing", "invalid"],
)
def test_load_initial_raises(
    source: FileConfigSource, config_file: Path, content: str | None, expected: str
) -> None:
    if content is None:
        config_file.unlink()
    else:
        write(config_file, content)
    with pytest.raises(ConfigError) as info:
        source.load_initial()
    assert info.value.errors[0].startswith(expected)
    assert source.store.current is EMPTY_SNAPSHOT


def test_reload_on_change_reuses_instances(
    source: FileConfigSource, config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = source.load_initial()
    write(config_file, TWO_ROUTES)
    with caplog.at_level(logging.INFO, logger="engine.store"):
        assert source.check_once() is True
    current = source.store.current
    assert (current.version, sorted(current.routes)) == (2, ["private", "public"])
    assert current.chain_for("public").policies[0].instance is (  # type: ignore[union-attr]
        first.chain_for("public").policies[0].instance  # type: ignore[union-attr]
    )
    assert caplog.messages == [f"config reloaded from {config_file}: 2 routes"]


def test_same_content_rewritten_is_not_reloaded(
    source: FileConfigSource, config_file: Path
) -> None:
    first = source.load_initial()
    write(config_file, ONE_ROUTE)
    assert source.check_once() is False
    assert source.store.current is first


def test_invalid_update_keeps_old_snapshot_and_logs_each_error(
    source: FileConfigSource, config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = source.load_initial()
    write(config_file, INVALID)
    with caplog.at_level(logging.ERROR, logger="engine.store"):
        assert source.check_once() is False
        write(config_file, INVALID)  # touched again, same content: not re-logged
        assert source.check_once() is False
    assert source.store.current is first
    assert caplog.messages[0] == (
        f"config reload from {config_file} rejected (2 error(s)); keeping version 1"
    )
    assert caplog.messages[1].startswith(
        f"{config_file}: routes[public].policies[0] addHeader v9.0.0: policy 'addHeader'"
    )
    assert (
        caplog.messages[2] == f"{config_file}: routes[public].policies[1]: unknown field 'priority'"
    )
    assert len(caplog.messages) == 3
    write(config_file, TWO_ROUTES)
    assert source.check_once() is True
    assert source.store.current.version == 2


def test_missing_file_keeps_old_snapshot_and_logs_once(
    source: FileConfigSource, config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = source.load_initial()
    config_file.unlink()
    with caplog.at_level(logging.ERROR, logger="engine.store"):
        assert source.check_once() is False
        assert source.check_once() is False
    assert source.store.current is first
    assert caplog.messages == [
        f"config file {config_file} unreadable (No such file or directory); keeping version 1"
    ]
    write(config_file, TWO_ROUTES)
    assert source.check_once() is True


async def test_run_polls_until_cancelled(source: FileConfigSource, config_file: Path) -> None:
    source.load_initial()
    published = asyncio.Event()
    source.store.add_listener(lambda snapshot: published.set())
    task = asyncio.create_task(source.run())
    try:
        write(config_file, TWO_ROUTES)
        await asyncio.wait_for(published.wait(), timeout=2)
        assert sorted(source.store.current.routes) == ["private", "public"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_unexpected_load_failure_keeps_old_snapshot_and_polling(
    source: FileConfigSource,
    config_file: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loader bug (anything but ConfigError) rejects that file; it must not end reloads."""
    first = source.load_initial()

    def broken(*args: object, **kwargs: object) -> Snapshot:
        raise RuntimeError("loader bug")

    with monkeypatch.context() as patch:
        patch.setattr("engine.store.load_config", broken)
        write(config_file, TWO_ROUTES)
        with caplog.at_level(logging.ERROR, logger="engine.store"):
            assert source.check_once() is False
    assert source.store.current is first
    assert caplog.messages == [
        f"config reload from {config_file} failed (RuntimeError: loader bug); keeping version 1"
    ]
    write(config_file, TWO_ROUTES + "  other:\n    policies: []\n")
    assert source.check_once() is True
    assert source.store.current.version == 2
