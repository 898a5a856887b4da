"""Entry point of every `pytest_test` target: run pytest on the given files.

Bazel starts this script from the runfiles root of the main repository, so the
repository's pyproject.toml (copied in as data) configures pytest exactly as a
plain `pytest` from the repository root does.
"""

from __future__ import annotations

import os
import sys

import pytest

if __name__ == "__main__":
    args = [
        "-c",
        "pyproject.toml",
        "--rootdir",
        os.getcwd(),
        # The runfiles tree is read-only in spirit: no .pytest_cache in it.
        "-p",
        "no:cacheprovider",
        *sys.argv[1:],
    ]
    # Bazel's XML report location, when it asks for one.
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append(f"--junitxml={xml}")
    sys.exit(pytest.main(args))
