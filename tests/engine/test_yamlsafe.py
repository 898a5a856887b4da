"""Tests of engine.yamlsafe: YAML that would crash, hang or mislead later stages."""

from __future__ import annotations

import pytest

from engine.yamlsafe import MAX_DEPTH, YamlError, load_yaml

# The "billion laughs" shape: each level references the previous one nine times.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]\n"
    for prev, cur in zip("abcdefg", "bcdefgh", strict=True)
)


def error_of(text: str | bytes) -> str:
    with pytest.raises(YamlError) as info:
        load_yaml(text)
    return str(info.value)


def test_alias_bomb_is_rejected_before_anything_expands_it() -> None:
    assert len(BOMB) < 600
    assert error_of(BOMB).startswith(
        "line 1, column 1: aliases expand this document by 54,480,987 nodes"
    )
    assert "is it an alias bomb?" in error_of(BOMB)


def test_ordinary_aliases_and_merge_keys_still_work() -> None:
    text = (
        "common: &common [{name: a, version: v1.0.0}]\n"
        "routes:\n"
        "  r1: {policies: *common}\n"
        "  r2: {policies: *common}\n"
        "base: &b {x: 1, y: 2}\n"
        "derived: {<<: *b, y: 3}\n"
    )
    data = load_yaml(text)
    assert data["routes"]["r2"]["policies"] == [{"name": "a", "version": "v1.0.0"}]
    assert data["derived"] == {"x": 1, "y": 3}


def test_alias_to_its_own_container_is_rejected() -> None:
    assert error_of("a: &r [1, *r]\n") == (
        "line 1, column 4: an alias refers to the node that contains it"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("a: !!int abc\n", "line 1, column 4: cannot read 'abc' as int", id="int-abc"),
        pytest.param(
            "a: !!float abc\n", "line 1, column 4: cannot read 'abc' as float", id="float-abc"
        ),
        pytest.param(
            "a: " + "1" * 5000 + "\n",
            "line 1, column 4: cannot read '1111111111111111111111111111111111111111... "
            "(5000 characters)' as int: Exceeds the limit (4300 digits)",
            id="int-5000-digits",
        ),
        pytest.param(
            "a: !!timestamp notadate\n",
            "line 1, column 4: tag '!!timestamp' is not supported",
            id="timestamp-tag",
        ),
        pytest.param("a: !!binary eHg=\n", "line 1, column 4: tag '!!binary'", id="binary"),
        pytest.param("a: !!set {x}\n", "line 1, column 4: tag '!!set'", id="set"),
        pytest.param("a: !!omap [x: 1]\n", "line 1, column 4: tag '!!omap'", id="omap-tuples"),
        pytest.param("a: !custom x\n", "line 1, column 4: tag '!custom'", id="local-tag"),
        pytest.param(
            "1: x\n", "line 1, column 1: mapping keys must be strings, got '1'", id="int-key"
        ),
        pytest.param(
            "on: x\n", "line 1, column 1: mapping keys must be strings, got 'on'", id="bool-key"
        ),
        pytest.param(
            "? [a]\n: x\n", "line 1, column 3: mapping keys must be strings", id="list-key"
        ),
        pytest.param(
            "a:\n" + "".join("  " * i + " - \n" for i in range(1, MAX_DEPTH + 2)),
            f"nested more than {MAX_DEPTH} levels deep",
            id="deep-block",
        ),
        pytest.param(b"a: \xff\xfe\n", "unacceptable character #x00ff", id="not-utf8"),
        pytest.param("a: \x00\n", "unacceptable character #x0000", id="nul"),
    ],
)
def test_rejected(text: str | bytes, expected: str) -> None:
    assert expected in error_of(text)


def test_dates_are_strings_even_impossible_ones() -> None:
    # YAML 1.1 would build datetime.date objects (and crash on 2026-13-45).
    assert load_yaml("a: 2026-01-01\n2026-13-45: b\nc: 2026-02-30 10:00:00\n") == {
        "a": "2026-01-01",
        "2026-13-45": "b",
        "c": "2026-02-30 10:00:00",
    }


def test_plain_values_and_empty_document() -> None:
    assert load_yaml("a: [1, 1.5, true, null, x, .nan]\n")["a"][:5] == [1, 1.5, True, None, "x"]
    assert load_yaml("") is None
    assert load_yaml("# only a comment\n") is None
