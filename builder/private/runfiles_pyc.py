"""Bytecode of an engine's runfiles, as a tar to merge into its image layer.

Build action of ``engine_image`` (builder/private/image.bzl, rule ``_engine_files``). Reads
``--files``: lines ``<path in the image>\\t<file>``; compiles every ``.py`` among them
(builder/private/pyc.py: unchecked-hash pycs, reproducible) and writes ``--output``, a tar
of ``<dir>/__pycache__/<module>.cpython-311.pyc`` entries (and their ``__pycache__``
directories), sorted, mtime and owners fixed like pkg_tar's.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from builder.private.pyc import compile_pyc, pyc_path

__all__ = ["main"]

MTIME = 946684800  # 2000-01-01, as pkg_tar


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runfiles_pyc", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    members: dict[str, bytes | None] = {}
    for line in args.files.read_text("utf-8").splitlines():
        dest, _, source = line.partition("\t")
        if not dest.endswith(".py"):
            continue
        pyc = compile_pyc(Path(source).read_bytes(), "/" + dest)
        if pyc is not None:
            target = pyc_path(dest)
            members[str(PurePosixPath(target).parent)] = None
            members[target] = pyc
    with tarfile.open(args.output, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            data = members[name]
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
