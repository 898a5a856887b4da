"""Tests of engine.store: publishing snapshots and hot-reloading a config file."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine.chain import Snapshot
from engine.config import load_config, load_config_file
from engine.errors import ConfigError
from engine.registry import PolicyRegistry, load_policy
from engine.settle import MAX_FILE_BYTES
from engine.store import EMPTY_SNAPSHOT, ConfigSource, ConfigStore, FileConfigSource
from engine.testing import FakeClock
from tests.support import policy_folder, registry_from

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
    return FileConfigSource(config_file, registry, ConfigStore(), poll_interval=0.01, settle=0)


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


@pytest.mark.parametrize("kind", ["fifo", "device", "too-large"])
def test_a_file_that_never_ends_keeps_old_snapshot(
    source: FileConfigSource, config_file: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the config file replaced by a FIFO blocked the poll thread for good (no
    reload ever again), a symlink to /dev/zero (or a file of gigabytes) was read whole
    until the engine ran out of memory. Now such a file is unreadable: the snapshot
    stays, and the reason is logged."""
    first = source.load_initial()
    config_file.unlink()
    if kind == "fifo":
        os.mkfifo(config_file)
        reason = "not a regular file"
    elif kind == "device":
        config_file.symlink_to("/dev/null")  # /dev/zero, before: read until out of memory
        reason = "not a regular file"
    else:
        with config_file.open("wb") as f:  # sparse: no disk used
            f.truncate(MAX_FILE_BYTES + 1)
        reason = f"{MAX_FILE_BYTES + 1} bytes, over the limit of {MAX_FILE_BYTES}"
    polled: list[bool] = []
    with caplog.at_level(logging.ERROR, logger="engine.store"):
        thread = threading.Thread(target=lambda: polled.append(source.check_once()), daemon=True)
        thread.start()
        thread.join(10)
        if thread.is_alive() and kind == "fifo":  # unblock the reader, then fail
            with open(config_file, "wb"):
                pass
    assert polled == [False], "the poll did not return"
    assert source.store.current is first
    assert caplog.messages == [
        f"config file {config_file} unreadable ({reason}); keeping version 1"
    ]
    with pytest.raises(ConfigError) as info:
        load_config_file(config_file, source.registry)
    assert list(info.value.errors) == [f"cannot read: {reason}"]


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


# --------------------------------------------------------------------------- half-written files

# A prefix of a valid config that is itself valid: the route keeps only its first policy.
FULL = """
routes:
  secure:
    policies:
      - {name: addHeader, version: v1.0.0, parameters: {header: x-a, value: "1"}}
      - {name: addHeader, version: v1.0.0, parameters: {header: x-b, value: "2"}}
"""
HALF = FULL[: FULL.index("      - {name: addHeader, version: v1.0.0, parameters: {header: x-b")]


@pytest.fixture
def settling(config_file: Path, registry: PolicyRegistry) -> tuple[FileConfigSource, FakeClock]:
    clock = FakeClock()
    source = FileConfigSource(config_file, registry, ConfigStore(), settle=2.0, clock=clock)
    source.settle = 0.0  # the fixture's file was just written: skip the start-up wait
    source.load_initial()
    source.settle = 2.0
    return source, clock


def test_prefix_of_the_config_is_itself_valid() -> None:
    registry = registry_from("addHeader")
    half = load_config(HALF, source="half", registry=registry)
    assert len(half.routes["secure"].policies) == 1  # what main published mid-write


def test_in_place_write_is_loaded_only_once_settled(
    settling: tuple[FileConfigSource, FakeClock],
    config_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, clock = settling
    first = source.store.current
    with caplog.at_level(logging.INFO, logger="engine.store"), config_file.open("w") as f:
        f.write(HALF)
        f.flush()
        for _ in range(3):  # the writer pauses 1.5 s: the half never settles
            clock.advance(0.5)
            assert source.check_once() is False
        f.write(FULL[len(HALF) :])
        f.flush()
        clock.advance(0.5)
        assert source.check_once() is False  # changed again: the wait starts over
        clock.advance(1.5)
        assert source.check_once() is False
    assert source.store.current is first
    clock.advance(0.5)
    with caplog.at_level(logging.INFO, logger="engine.store"):
        assert source.check_once() is True
    assert len(source.store.current.routes["secure"].policies) == 2
    assert source.store.current.version == 2  # the half was never published
    deferred = [m for m in caplog.messages if "loading it once unchanged" in m]
    assert deferred == [
        f"config file {config_file} changed; loading it once unchanged for 2s "
        "(write it atomically, temp file + rename, to skip nothing)"
    ]


def test_atomic_rename_is_loaded_after_settling(
    settling: tuple[FileConfigSource, FakeClock], config_file: Path
) -> None:
    source, clock = settling
    tmp = config_file.with_name("routes.yaml.tmp")
    tmp.write_text(TWO_ROUTES)
    os.replace(tmp, config_file)
    assert source.check_once() is False
    clock.advance(2.0)
    assert source.check_once() is True
    assert sorted(source.store.current.routes) == ["private", "public"]


def test_reverting_to_the_loaded_content_cancels_the_change(
    settling: tuple[FileConfigSource, FakeClock], config_file: Path
) -> None:
    source, clock = settling
    first = source.store.current
    write(config_file, TWO_ROUTES)
    assert source.check_once() is False
    write(config_file, ONE_ROUTE)
    clock.advance(5)
    assert source.check_once() is False
    assert source.check_once() is False
    assert source.store.current is first


def test_kubernetes_configmap_symlink_swap(registry: PolicyRegistry, tmp_path: Path) -> None:
    """The kubelet's layout: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>;
    an update writes a new timestamped directory and renames a new ..data link over the old."""
    (tmp_path / "..2026_12_01_20_00_00.1").mkdir()
    (tmp_path / "..2026_12_01_20_00_00.1" / "config.yaml").write_text(ONE_ROUTE)
    (tmp_path / "..data").symlink_to("..2026_12_01_20_00_00.1")
    (tmp_path / "config.yaml").symlink_to("..data/config.yaml")
    clock = FakeClock()
    source = FileConfigSource(
        tmp_path / "config.yaml", registry, ConfigStore(), settle=0.0, clock=clock
    )
    assert list(source.load_initial().routes) == ["public"]
    source.settle = 2.0
    (tmp_path / "..2026_12_01_20_05_00.2").mkdir()
    (tmp_path / "..2026_12_01_20_05_00.2" / "config.yaml").write_text(TWO_ROUTES)
    (tmp_path / "..data_tmp").symlink_to("..2026_12_01_20_05_00.2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # the atomic swap
    shutil.rmtree(tmp_path / "..2026_12_01_20_00_00.1")
    assert source.check_once() is False
    clock.advance(2.0)
    assert source.check_once() is True
    assert sorted(source.store.current.routes) == ["private", "public"]


def test_load_initial_waits_for_a_file_being_written(
    registry: PolicyRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(HALF)

    def finish() -> None:
        time.sleep(0.1)
        with path.open("a") as f:
            f.write(FULL[len(HALF) :])

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        source = FileConfigSource(path, registry, ConfigStore(), settle=1.0)
        snapshot = source.load_initial()
    finally:
        writer.join()
    assert len(snapshot.routes["secure"].policies) == 2


# --------------------------------------------------------------------------- off the loop


async def test_snapshots_are_built_off_the_event_loop(config_file: Path) -> None:
    """A policy constructor that needs the loop to keep running while it works: on main,
    where reloads ran on the loop, it timed out and the config was rejected."""
    loop_ran = threading.Event()
    constructing = threading.Event()

    def factory(params: Any) -> object:
        constructing.set()
        if not loop_ran.wait(timeout=5):
            raise RuntimeError("the event loop was blocked while building the snapshot")
        return object()

    add_header = load_policy(policy_folder("addHeader"))
    slow = PolicyRegistry([dataclasses.replace(add_header, factory=factory)])
    source = FileConfigSource(config_file, registry_from("addHeader"), ConfigStore(), settle=0)
    source.poll_interval = 0.01
    source.load_initial()
    source.registry = slow
    write(config_file, TWO_ROUTES.replace('value: "1"', 'value: "2"'))
    published = asyncio.Event()
    source.store.add_listener(lambda snapshot: published.set())
    task = asyncio.create_task(source.run())
    try:
        assert await asyncio.to_thread(constructing.wait, 10)
        loop_ran.set()  # only possible while the constructor runs if the loop is free
        await asyncio.wait_for(published.wait(), timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert source.store.current.version == 2
