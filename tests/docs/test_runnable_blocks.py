"""Every shell block marked runnable in the docs runs and exits 0.

A block is runnable when its fence's info string is ``sh runnable``. Each runs with
``bash -euo pipefail`` in a fresh temporary directory, with a timeout, ``python3`` and
``python`` on ``PATH`` being this test's interpreter, ``PYTHONPATH`` this test's import
path (so ``python3 -m engine.tls_testing`` and ``python3 -m builder.new_policy`` work
under Bazel and under plain pytest) and ``REPO`` the repository root.

Only blocks that run offline, in seconds and without Bazel are marked. Blocks that need
Bazel or a built engine (``tools/bazel run //tools/demo``, ``//builder:build``, the
control plane and engine command lines) stay plain ``sh``: ``tools/test`` covers them by
running the demo in ``--check`` and ``--check --xds`` modes and the builder end to end
(``//tests/builder:build_e2e_test``, which also builds a ``//builder:new_policy`` scaffold).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from tests.docs.markdown import DOCS, REPO, Block, fenced_blocks

TIMEOUT_SECONDS: Final = 60
MARK: Final = "sh runnable"


def _runnable() -> list[tuple[str, Block]]:
    found = []
    for doc in DOCS:
        for block in fenced_blocks(doc.read_text(encoding="utf-8")):
            if block.info == MARK:
                found.append((f"{doc.relative_to(REPO)}:{block.line}", block))
    return found


RUNNABLE: Final = _runnable()


def _environment(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    for name in ("python3", "python"):
        (bin_dir / name).symlink_to(sys.executable)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "/usr/bin:/bin")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), *sys.path] if p)
    env["REPO"] = str(REPO)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def test_some_blocks_are_runnable() -> None:
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize(("where", "block"), RUNNABLE, ids=[where for where, _ in RUNNABLE])
def test_runnable_block(where: str, block: Block, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.text],
        cwd=work,
        env=_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, (
        f"{where}: exit {result.returncode}\n--- block\n{block.text}"
        f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    )
