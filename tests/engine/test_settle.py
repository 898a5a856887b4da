"""engine.settle: a set of files is handed over only once it has stayed unchanged."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine.settle import SettledFiles


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def waiting(settled: SettledFiles) -> bool:
    """Read through a call: mypy narrows a property across asserts."""
    return settled.waiting


def write(path: Path, text: str) -> None:
    """Write ``text`` and move the mtime on, so that fast writes never share one."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@pytest.fixture
def files(tmp_path: Path) -> tuple[SettledFiles, FakeClock, Path]:
    clock = FakeClock()
    write(tmp_path / "a.yaml", "a: 1\n")
    settled = SettledFiles(lambda: sorted(tmp_path.glob("*.yaml")), 2.0, clock=clock)
    settled.take()
    return settled, clock, tmp_path


def test_a_change_is_handed_over_once_settled(files: tuple[SettledFiles, FakeClock, Path]) -> None:
    settled, clock, folder = files
    assert settled.poll() is None  # unchanged
    write(folder / "a.yaml", "a: 2\n")
    assert settled.poll() is None
    assert waiting(settled)
    clock.advance(1.9)
    assert settled.poll() is None
    clock.advance(0.1)
    assert settled.poll() == {folder / "a.yaml": b"a: 2\n"}
    assert not waiting(settled)
    assert settled.poll() is None  # handed over once


def test_a_second_file_restarts_the_wait_for_the_whole_set(
    files: tuple[SettledFiles, FakeClock, Path],
) -> None:
    settled, clock, folder = files
    write(folder / "b.yaml", "b: 1\n")
    assert settled.poll() is None
    clock.advance(1.5)
    write(folder / "a.yaml", "a: 0\n")  # the other half of a move
    assert settled.poll() is None
    clock.advance(1.5)
    assert settled.poll() is None  # 3 s since the first write, 1.5 s since the last
    clock.advance(0.5)
    assert settled.poll() == {folder / "a.yaml": b"a: 0\n", folder / "b.yaml": b"b: 1\n"}


def test_a_removed_file_is_a_change(files: tuple[SettledFiles, FakeClock, Path]) -> None:
    settled, clock, folder = files
    write(folder / "b.yaml", "b: 1\n")
    clock.advance(0)
    assert settled.poll() is None
    clock.advance(2)
    assert settled.poll() is not None
    (folder / "b.yaml").unlink()
    assert settled.poll() is None
    clock.advance(2)
    assert settled.poll() == {folder / "a.yaml": b"a: 1\n"}


def test_reverting_cancels_the_change(files: tuple[SettledFiles, FakeClock, Path]) -> None:
    settled, clock, folder = files
    write(folder / "a.yaml", "a: 2\n")
    assert settled.poll() is None
    write(folder / "a.yaml", "a: 1\n")
    clock.advance(5)
    assert settled.poll() is None
    assert not waiting(settled)


def test_first_poll_takes_old_files_at_once_and_waits_for_fresh_ones(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "c.yaml"
    write(path, "c: 1\n")
    fresh = SettledFiles(lambda: [path], 2.0, clock=clock)
    assert fresh.poll() is None  # written just now: it may still be being written
    clock.advance(2)
    assert fresh.poll() == {path: b"c: 1\n"}
    old = time.time() - 60
    os.utime(path, (old, old))
    assert SettledFiles(lambda: [path], 2.0, clock=clock).poll() == {path: b"c: 1\n"}


def test_accept_records_what_the_caller_loaded(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "c.yaml"
    write(path, "c: 1\n")
    settled = SettledFiles(lambda: [path], 2.0, clock=clock)
    settled.accept({path: b"c: 0\n"})  # the caller loaded older bytes than the file's
    assert settled.poll() is None
    clock.advance(2)
    assert settled.poll() == {path: b"c: 1\n"}


def test_an_unreadable_set_raises_and_starts_over(
    files: tuple[SettledFiles, FakeClock, Path],
) -> None:
    settled, _, folder = files
    settled.list_files = lambda: [folder / "missing.yaml"]
    with pytest.raises(OSError, match="No such file"):
        settled.poll()
    assert not waiting(settled)
