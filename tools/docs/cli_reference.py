"""docs/reference/cli.md, generated from the command lines' own argument parsers.

``python -m tools.docs.cli_reference --write`` (from the repository root) rewrites the
file; ``--check`` exits 1 when the committed file differs from what the parsers say
(``tests/docs/test_cli_reference.py`` does the same check). The help text is rendered at
a fixed width, so the output does not depend on the terminal.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = ["COMMANDS", "OUTPUT", "REGENERATE", "main", "parser", "render"]

REPO: Final = Path(__file__).resolve().parents[2]
OUTPUT: Final = Path("docs/reference/cli.md")
"""Relative to the repository root."""
REGENERATE: Final = "python -m tools.docs.cli_reference --write"
_WIDTH: Final = "100"


COMMANDS: Final[tuple[tuple[str, str, str], ...]] = (
    # (title, what it is, the module whose build_parser() describes it)
    (
        "engine",
        "The policy engine: the builder's `engine` binaries, the zero-policy `//engine`, "
        "the OCI image's entrypoint.",
        "engine.main",
    ),
    (
        "engine explain",
        "What a route's chain would do for one request, without calling a policy hook "
        "([troubleshooting](../operators/troubleshooting.md#explain-what-a-route-would-do-with-a-request)).",
        "engine.explain_cli",
    ),
    (
        "controlplane",
        "The xDS control plane and its admin API: `tools/bazel run //controlplane -- ...`.",
        "controlplane.main",
    ),
    (
        "builder build",
        "Validate a manifest and build an engine: `tools/bazel run //builder:build -- ...`.",
        "builder.build",
    ),
    (
        "builder new_policy",
        "Scaffold a policy folder: `tools/bazel run //builder:new_policy -- ...`.",
        "builder.new_policy",
    ),
)


def _help(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _WIDTH  # argparse wraps at the terminal's width otherwise
    try:
        return parser.format_help().rstrip() + "\n"
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def parser(module: str) -> argparse.ArgumentParser:
    """``module.build_parser()``: imported on use, after :func:`_ensure_protos`."""
    built: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    return built


def render() -> str:
    """The whole reference page, as the parsers describe the command lines now."""
    parts = [
        "# Command-line reference\n",
        f"Generated from the argument parsers by `{REGENERATE}`; do not edit by hand "
        "(`tests/docs/test_cli_reference.py` fails when this file is stale). What the flags "
        "mean in practice: [operators' guides](../operators/README.md).\n",
    ]
    for title, what, module in COMMANDS:
        parts.append(f"## {title}\n")
        parts.append(f"{what} Parser: `{module}.build_parser()`.\n")
        parts.append("```text\n" + _help(parser(module)) + "```\n")
    return "\n".join(parts)


def _ensure_protos() -> None:
    """Plain Python (not Bazel) needs proto/'s generated modules, as conftest.py does."""
    if importlib.util.find_spec("policy_engine") is None:
        gen_protos = importlib.import_module("tools.protoc.gen_protos")
        sys.path.insert(0, str(gen_protos.ensure_generated()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.docs.cli_reference")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"rewrite {OUTPUT}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {OUTPUT} is stale")
    args = parser.parse_args(argv)
    _ensure_protos()
    path = REPO / OUTPUT
    text = render()
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {OUTPUT}")
        return 0
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        print(f"{OUTPUT} is stale: run `{REGENERATE}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
