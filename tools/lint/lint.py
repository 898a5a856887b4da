"""Lint and type-check the files given on the command line: ruff, then mypy.

Run by the `lint_test` targets (tools/lint/defs.bzl) under `bazel test`, so a
lint or type error fails the test command like any failing test. Settings come
from the repository's pyproject.toml, the same file plain `ruff`/`mypy` read.

Usage: lint.py --ruff-wheel WHEEL [--no-mypy] [--mypy-base DIR] FILE...

``--mypy-base DIR`` adds DIR to mypy's package bases (MYPYPATH), for folders whose
path holds a name that is not a Python identifier (a policy's ``v1.0.0``).
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mypy import api

__all__ = ["main"]


def _extract_ruff(wheel: Path, into: Path) -> Path:
    """ruff is a native binary shipped in its wheel's scripts folder; rules_python
    0.22 exposes the wheel but not that folder, so take the binary from the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".data/scripts/ruff"))
        target = into / "ruff"
        target.write_bytes(zf.read(member))
    target.chmod(target.stat().st_mode | stat.S_IEXEC)
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ruff-wheel", type=Path, required=True)
    parser.add_argument("--no-mypy", action="store_true")
    parser.add_argument("--mypy-base", action="append", default=[])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    files = sorted(set(args.files))

    failed = False
    with tempfile.TemporaryDirectory(dir=os.environ.get("TEST_TMPDIR")) as tmp:
        ruff = _extract_ruff(args.ruff_wheel, Path(tmp))
        cache = ["--cache-dir", str(Path(tmp) / "ruff-cache")]
        for cmd in (
            [str(ruff), "check", "--config", "pyproject.toml", *cache, *files],
            [str(ruff), "format", "--check", "--config", "pyproject.toml", *cache, *files],
        ):
            print("$", " ".join(cmd[:3]), f"... ({len(files)} files)", flush=True)
            failed |= subprocess.run(cmd, check=False).returncode != 0

        if not args.no_mypy:
            print(f"$ mypy ... ({len(files)} files)", flush=True)
            if args.mypy_base:
                # explicit_package_bases (pyproject.toml) reads bases from MYPYPATH.
                os.environ["MYPYPATH"] = os.pathsep.join(
                    os.path.abspath(base) for base in args.mypy_base
                )
            out, err, status = api.run(
                [
                    "--config-file",
                    "pyproject.toml",
                    "--cache-dir",
                    str(Path(tmp) / "mypy-cache"),
                    "--python-executable",
                    sys.executable,
                    *files,
                ]
            )
            sys.stdout.write(out)
            sys.stderr.write(err)
            failed |= status != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
