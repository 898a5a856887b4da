"""Tests of uploadGuard v1.0.0: type, size and digest of a streamed request body."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.registry import load_policy
from engine.streaming_testing import stream_body
from engine.testing import construct, example_id, make_request_context, valid_examples

FOLDER = Path(__file__).resolve().parents[1]
POLICY = load_policy(FOLDER)


def test_definition_examples_behave_as_declared() -> None:
    assert POLICY.check_examples() == []


@pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
def test_valid_examples_construct(example: Mapping[str, Any]) -> None:
    construct(POLICY, example["parameters"])


async def test_streamed_body_is_digested_and_passed_unchanged() -> None:
    policy = construct(POLICY, {})
    ctx = make_request_context(method="POST")
    pieces = [b"a" * 1000, b"b" * 5000, b""]
    out = await stream_body(policy, ctx, pieces)
    assert out.pieces == pieces
    assert ctx.metadata["uploadGuard.sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert ctx.metadata["uploadGuard.bytes"] == 6000


async def test_crossing_the_limit_answers_413_at_once() -> None:
    policy = construct(POLICY, {"maxBytes": 1500})
    out = await stream_body(policy, make_request_context(), [b"x" * 1000, b"x" * 1000, b"never"])
    assert out.pieces == [b"x" * 1000]
    assert out.immediate is not None
    assert out.immediate.status == 413


def test_headers_checked_first() -> None:
    policy = construct(POLICY, {"maxBytes": 10, "contentTypes": ["application/gzip"]})
    wrong = make_request_context(headers={"content-type": "text/plain"})
    assert policy.on_request(wrong).status == 415
    declared = make_request_context(
        headers={"content-type": "Application/GZIP; x=1", "content-length": "11"}
    )
    assert policy.on_request(declared).status == 413
    fine = make_request_context(headers={"content-type": "application/gzip"})
    assert policy.on_request(fine) is None


def test_buffered_body_gets_the_same_rules() -> None:
    policy = construct(POLICY, {"maxBytes": 4})
    assert policy.on_request(make_request_context(body=b"12345")).status == 413
    ctx = make_request_context(body=b"1234")
    assert policy.on_request(ctx) is None
    assert ctx.metadata["uploadGuard.bytes"] == 4


async def test_without_digest_nothing_is_written() -> None:
    ctx = make_request_context()
    await stream_body(construct(POLICY, {"digest": False}), ctx, [b"abc", b""])
    assert "uploadGuard.sha256" not in ctx.metadata
