"""Tests of engine.metadata: values CEL cannot represent are converted or dropped where
they are written, so they can no longer make every metadata condition fail."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from engine.conditions import compile_condition
from engine.metadata import CURRENT_POLICY, MAX_DEPTH, RequestMetadata, cel_value
from engine.testing import make_request_context


class Opaque:
    def __repr__(self) -> str:
        return "Opaque()"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def cut(levels: int) -> Any:
    """What nested() becomes when cut at ``levels``: the part below is dropped."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "expected", "problem"),
    [
        pytest.param(2**64, float(2**64), "integer outside int64/uint64 converted", id="2^64"),
        pytest.param(-(2**63) - 1, float(-(2**63) - 1), "converted to double", id="below-int64"),
        pytest.param(10**400, None, "integer too large for CEL (dropped)", id="no-float-holds"),
        pytest.param("a\ud800b", "a\ufffdb", "lone surrogate replaced by U+FFFD", id="surrogate"),
        pytest.param((1, "x"), [1, "x"], "tuple converted to a list", id="tuple"),
        pytest.param({3, 1, 2}, [1, 2, 3], "set converted to a list", id="set"),
        pytest.param(Opaque(), None, "Opaque is not a CEL value (dropped)", id="object"),
        pytest.param({"a": Opaque(), "b": 1}, {"b": 1}, "['a']: Opaque is not", id="nested-object"),
        pytest.param(
            {1.5: "x", "k": (1,)}, {"k": [1]}, "[1.5]: float key (entry dropped)", id="key"
        ),
        pytest.param(
            nested(MAX_DEPTH + 5), cut(MAX_DEPTH), f"nested more than {MAX_DEPTH}", id="deep"
        ),
        pytest.param(bytearray(b"ab"), b"ab", "", id="bytearray"),
    ],
)
def test_cel_value_converts_or_drops(value: Any, expected: Any, problem: str) -> None:
    converted, problems = cel_value(value)
    assert converted == expected
    assert problem in "; ".join(problems)


def test_clean_values_are_stored_without_copying() -> None:
    claims = {"sub": "u1", "aud": ["api"], "exp": 1_900_000_000, "big": 2**64 - 1, "n": None}
    assert cel_value(claims) == (claims, [])
    assert cel_value(claims)[0] is claims


def test_writes_are_converted_and_logged_with_policy_and_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metadata = RequestMetadata()
    token = CURRENT_POLICY.set("jwtValidation v2.0.0")
    try:
        with caplog.at_level(logging.WARNING, logger="engine.metadata"):
            metadata["jwt.claims"] = {"sub": "\ud800", "n": 2**64}
            metadata.update({"tags": ("a", "b")})
            metadata.setdefault("obj", Opaque())
    finally:
        CURRENT_POLICY.reset(token)
    assert dict(metadata) == {
        "jwt.claims": {"sub": "\ufffd", "n": float(2**64)},
        "tags": ["a", "b"],
    }
    assert caplog.messages == [
        "policy jwtValidation v2.0.0 wrote metadata 'jwt.claims' that CEL cannot represent: "
        "['sub']: lone surrogate replaced by U+FFFD; "
        "['n']: integer outside int64/uint64 converted to double",
        "policy jwtValidation v2.0.0 wrote metadata 'tags' that CEL cannot represent: "
        "tuple converted to a list",
        "policy jwtValidation v2.0.0 wrote metadata 'obj' that CEL cannot represent: "
        "Opaque is not a CEL value (dropped)",
    ]


def test_a_dropped_write_removes_the_old_value() -> None:
    metadata = RequestMetadata({"k": "old"})
    metadata["k"] = Opaque()
    assert "k" not in metadata


def test_a_plain_dict_is_wrapped_in_place() -> None:
    shared: dict[Any, Any] = {"t": (1,), 5: "x"}
    ctx = make_request_context(metadata=shared)
    assert isinstance(ctx.metadata, RequestMetadata)
    ctx.metadata["new"] = "v"
    assert shared == {"t": [1], "new": "v"}  # checked, and the caller's dict sees writes


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(2**64, id="int-2^64"),
        pytest.param(-(2**63) - 1, id="int-below-int64"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param((1, 2), id="tuple"),
        pytest.param({1, 2}, id="set"),
        pytest.param(Opaque(), id="object"),
        pytest.param(nested(100_000), id="nested-100000"),  # crashed the process (SIGSEGV)
    ],
)
def test_one_bad_value_no_longer_fails_every_metadata_condition(bad: Any) -> None:
    ctx = make_request_context(metadata={"authenticated": True})
    ctx.metadata["claim"] = bad
    condition = compile_condition("metadata.authenticated == true")
    assert condition.evaluate_request(ctx) is True
