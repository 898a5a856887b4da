"""engine.cli: a command whose stdout reader has gone exits quietly (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.cli import EXIT_BROKEN_PIPE

ROOT = Path(__file__).resolve().parents[2]

ENGINE = (
    "import sys\n"
    "from engine.cli import run_cli\n"
    "from engine.main import main\n"
    "from engine.registry import PolicyRegistry\n"
    "sys.exit(run_cli(lambda: main(sys.argv[1:], registry=PolicyRegistry(()))))\n"
)


def run_with_closed_stdout(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the engine CLI with stdout a pipe whose read end is closed before it starts
    (as `engine --version | head -0` leaves it, without the race)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-c", ENGINE, *argv],
            cwd=ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


def test_version_with_closed_stdout_exits_quietly() -> None:
    result = run_with_closed_stdout(["--version"])
    assert result.stderr == ""
    assert result.returncode == EXIT_BROKEN_PIPE


def test_help_with_closed_stdout_exits_quietly() -> None:
    # argparse itself ignores the failed write; nothing may fail at exit either.
    result = run_with_closed_stdout(["--help"])
    assert result.stderr == ""
    assert result.returncode in (0, EXIT_BROKEN_PIPE)


def test_open_stdout_is_unchanged() -> None:
    result = subprocess.run(
        [sys.executable, "-c", ENGINE, "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("policy-engine ")
