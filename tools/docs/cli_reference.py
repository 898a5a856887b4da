"""docs/reference/cli.md, generated from the command lines' own argument parsers.

``python -m tools.docs.cli_reference --write`` (from the repository root) rewrites the
file; ``--check`` exits 1 when the committed file differs from what the parsers say
(``tests/docs/test_cli_reference.py`` does the same check). The help text is rendered at
a fixed width, so the output does not depend on the terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

__all__ = ["COMMANDS", "OUTPUT", "REGENERATE", "render"]

REPO: Final = Path(__file__).resolve().parents[2]
OUTPUT: Final = Path("docs/reference/cli.md")
"""Relative to the repository root."""
REGENERATE: Final = "python -m tools.docs.cli_reference --write"
_WIDTH: Final = "100"


def _engine() -> argparse.ArgumentParser:
    from engine.main import build_parser

    return build_parser()


def _controlplane() -> argparse.ArgumentParser:
    from controlplane.main import build_parser

    return build_parser()


def _builder_build() -> argparse.ArgumentParser:
    from builder.build import build_parser

    return build_parser()


def _builder_new_policy() -> argparse.ArgumentParser:
    from builder.new_policy import build_parser

    return build_parser()


COMMANDS: Final[tuple[tuple[str, str, str, Callable[[], argparse.ArgumentParser]], ...]] = (
    (
        "engine",
        "The policy engine: the builder's `engine` binaries, the zero-policy `//engine`, "
        "the OCI image's entrypoint.",
        "engine.main.build_parser",
        _engine,
    ),
    (
        "controlplane",
        "The xDS control plane and its admin API: `tools/bazel run //controlplane -- ...`.",
        "controlplane.main.build_parser",
        _controlplane,
    ),
    (
        "builder build",
        "Validate a manifest and build an engine: `tools/bazel run //builder:build -- ...`.",
        "builder.build.build_parser",
        _builder_build,
    ),
    (
        "builder new_policy",
        "Scaffold a policy folder: `tools/bazel run //builder:new_policy -- ...`.",
        "builder.new_policy.build_parser",
        _builder_new_policy,
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


def render() -> str:
    """The whole reference page, as the parsers describe the command lines now."""
    parts = [
        "# Command-line reference\n",
        f"Generated from the argument parsers by `{REGENERATE}`; do not edit by hand "
        "(`tests/docs/test_cli_reference.py` fails when this file is stale). What the flags "
        "mean in practice: [operators' guides](../operators/README.md).\n",
    ]
    for title, what, source, factory in COMMANDS:
        parts.append(f"## {title}\n")
        parts.append(f"{what} Parser: `{source}()`.\n")
        parts.append("```text\n" + _help(factory()) + "```\n")
    return "\n".join(parts)


def _ensure_protos() -> None:
    """Plain Python (not Bazel) needs proto/'s generated modules, as conftest.py does."""
    try:
        import policy_engine.v1  # noqa: F401
    except ModuleNotFoundError:
        from tools.protoc.gen_protos import ensure_generated

        sys.path.insert(0, str(ensure_generated()))


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
