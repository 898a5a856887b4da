"""docs/reference/cli.md is what the argument parsers say (tools/docs/cli_reference.py)."""

from __future__ import annotations

import difflib

import pytest

from tools.docs.cli_reference import COMMANDS, OUTPUT, REGENERATE, REPO, parser, render


def test_cli_reference_is_fresh() -> None:
    committed = (REPO / OUTPUT).read_text(encoding="utf-8")
    fresh = render()
    diff = "".join(
        difflib.unified_diff(
            committed.splitlines(keepends=True),
            fresh.splitlines(keepends=True),
            fromfile=f"{OUTPUT} (committed)",
            tofile=f"{OUTPUT} (from the parsers)",
        )
    )
    assert committed == fresh, f"{OUTPUT} is stale: run `{REGENERATE}`\n{diff}"


def test_every_command_and_flag_is_documented() -> None:
    text = render()
    for title, _, module in COMMANDS:
        assert f"## {title}\n" in text
        for action in parser(module)._actions:
            for flag in action.option_strings:
                assert flag in text, f"{title}: {flag}"


def test_output_does_not_depend_on_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    first = render()
    monkeypatch.setenv("COLUMNS", "40")
    assert render() == first
