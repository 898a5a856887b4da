"""Tests of sseGuard v1.0.0: masking and blocking per SSE event / NDJSON line, as streamed
by the engine's own pipeline (engine.streaming_testing.stream_body)."""

from __future__ import annotations

import gzip
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.errors import PolicyError
from engine.policy import (
    ParameterError,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)
from engine.registry import load_policy
from engine.streaming_testing import stream_body
from engine.testing import (
    construct,
    example_id,
    make_request_context,
    make_response_context,
    valid_examples,
)

FOLDER = Path(__file__).resolve().parents[1]
POLICY = load_policy(FOLDER)
SSE = {"content-type": "text/event-stream; charset=utf-8"}
NDJSON = {"content-type": "application/x-ndjson"}


def sse_ctx(headers: Mapping[str, str] = SSE) -> ResponseContext:
    return make_response_context(headers=headers)


def test_definition_examples_behave_as_declared() -> None:
    assert POLICY.check_examples() == []


@pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
def test_valid_examples_construct(example: Mapping[str, Any]) -> None:
    construct(POLICY, example["parameters"])


def test_bad_regex_names_the_field() -> None:
    with pytest.raises(ParameterError, match=r"block\.1: not a valid regular expression"):
        construct(POLICY, {"block": ["ok", "("]})


async def test_match_split_across_chunks_is_masked() -> None:
    policy = construct(POLICY, {"builtins": ["email"]})
    ctx = sse_ctx()
    out = await stream_body(
        policy, ctx, [b"data: hi\n\ndata: write to bob@exa", b"mple.com now\n\n", b""]
    )
    assert out.pieces == [b"data: hi\n\n", b"data: write to [redacted] now\n\n", b""]
    assert ctx.metadata["sseGuard.masked"] == 1


async def test_events_without_a_match_are_not_delayed() -> None:
    policy = construct(POLICY, {"builtins": ["email", "cardNumber"]})
    out = await stream_body(policy, sse_ctx(), [b"data: one\n\ndata: tw", b"o\n\n", b""])
    # Each complete event leaves with the piece that completed it.
    assert out.pieces == [b"data: one\n\n", b"data: two\n\n", b""]


async def test_card_numbers_and_custom_patterns() -> None:
    policy = construct(
        POLICY, {"builtins": ["cardNumber"], "mask": ["sk-[a-z0-9]{8}"], "replacement": "***"}
    )
    out = await stream_body(
        policy, sse_ctx(), [b"data: card 4111 1111 1111 1111, key sk-abcd1234, id 12345\n\n"]
    )
    assert out.body == b"data: card ***, key ***, id 12345\n\n"


async def test_block_ends_the_stream_with_a_final_event() -> None:
    policy = construct(POLICY, {"block": ["(?i)secret plan"]})
    ctx = sse_ctx()
    out = await stream_body(
        policy, ctx, [b"data: fine\n\n", b"data: the SECRET ", b"plan is\n\n", b"data: more\n\n"]
    )
    assert out.ended_early
    assert out.body == (
        b'data: fine\n\nevent: blocked\ndata: {"error": "content blocked by policy"}\n\n'
    )
    assert ctx.metadata["sseGuard.blocked"] is True


async def test_ndjson_lines() -> None:
    policy = construct(POLICY, {"builtins": ["email"], "block": ["DROP"], "blockEvent": "stop"})
    out = await stream_body(
        policy,
        sse_ctx(NDJSON),
        [b'{"to": "a@b.io"}\n{"x"', b": 1}\n", b"DROP\n", b"never\n"],
    )
    assert out.body == b'{"to": "[redacted]"}\n{"x": 1}\nstop\n'


async def test_other_content_types_pass_untouched() -> None:
    policy = construct(POLICY, {"builtins": ["email"]})
    ctx = sse_ctx({"content-type": "application/json"})
    out = await stream_body(policy, ctx, [b'{"to": "a@b', b'.io"}'])
    assert out.body == b'{"to": "a@b.io"}'


async def test_an_event_over_the_cap_fails_the_policy() -> None:
    policy = construct(POLICY, {"builtins": ["email"], "maxEventBytes": 64})
    out = await stream_body(policy, sse_ctx(), [b"data: " + b"x" * 100, b"\n\n"])
    assert out.immediate is not None
    assert out.immediate.status == 500
    # failOpen: the held bytes are released and the rest passes unmasked.
    out = await stream_body(
        policy, sse_ctx(), [b"data: " + b"x" * 100, b"\n\ndata: a@b.io\n\n"], fail_open=True
    )
    assert out.body == b"data: " + b"x" * 100 + b"\n\ndata: a@b.io\n\n"


def test_buffered_body_gets_the_same_rules() -> None:
    policy = construct(POLICY, {"builtins": ["email"], "block": ["BLOCK"]})
    body = b"data: a@b.io\n\ndata: BLOCK\n\ndata: after\n\n"
    action = policy.on_response(make_response_context(headers=SSE, body=body))
    assert action == ResponseModifications(
        body=b'data: [redacted]\n\nevent: blocked\ndata: {"error": "content blocked by policy"}\n\n'
    )
    assert policy.on_response(make_response_context(headers=SSE, body=b"data: x\n\n")) is None
    assert policy.on_response(make_response_context(headers=SSE)) is None


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate, gzip", "x-custom"])
async def test_a_content_coded_body_fails_the_policy_not_passes_unmasked(coding: str) -> None:
    # Before: a gzip-coded event stream was framed and matched as its compressed bytes,
    # so no pattern matched and the e-mail address passed to the client unmasked.
    event = b"data: write to bob@example.com\n\n"
    body = gzip.compress(event)
    policy = construct(POLICY, {"builtins": ["email"], "block": ["example"]})
    headers = {**SSE, "content-encoding": coding}
    out = await stream_body(policy, sse_ctx(headers), [body[:10], body[10:]])
    assert out.immediate is not None
    assert out.immediate.status == 500
    ndjson = {**NDJSON, "content-encoding": coding}
    out = await stream_body(policy, sse_ctx(ndjson), [b'{"to": "bob@example.com"}\n'])
    assert out.immediate is not None
    # The buffered path too (a route that cannot stream the body).
    with pytest.raises(PolicyError, match="content-encoding"):
        policy.on_response(make_response_context(headers=headers, body=body))


async def test_identity_coding_is_read() -> None:
    policy = construct(POLICY, {"builtins": ["email"]})
    headers = {**SSE, "content-encoding": "identity"}
    out = await stream_body(policy, sse_ctx(headers), [b"data: bob@example.com\n\n", b""])
    assert out.body == b"data: [redacted]\n\n"
    # Other content types still pass untouched, coded or not.
    other = {"content-type": "application/json", "content-encoding": "gzip"}
    out = await stream_body(policy, sse_ctx(other), [b"\x1f\x8b..", b""])
    assert out.body == b"\x1f\x8b.."


async def test_email_matching_is_linear_in_the_event_size() -> None:
    # Before: the email pattern was retried from every byte of a run of letters, each try
    # scanning to the run's end: one 64 KiB event (the default maxEventBytes) of letters
    # held the engine's event loop for about 7 s, every other request of the worker with it.
    policy = construct(POLICY, {"builtins": ["email", "cardNumber"]})
    for filler in (b"a" * 65000, b"a@" + b"a" * 65000, (b"a" * 64 + b"@" + b"b" * 253) * 200):
        started = time.perf_counter()
        out = await stream_body(policy, sse_ctx(), [b"data: " + filler + b"\n\n", b""])
        assert time.perf_counter() - started < 1.0
        assert out.body == b"data: " + filler + b"\n\n"
    # Still masked: addresses next to each other, and a local part of any length.
    out = await stream_body(
        policy, sse_ctx(), [b"data: z@q.io+bob@x.com " + b"x" * 80 + b"@ex.com\n\n", b""]
    )
    assert out.body == b"data: [redacted][redacted] " + b"x" * 16 + b"[redacted]\n\n"


def test_every_request_asks_for_an_uncoded_answer() -> None:
    # A coded body fails the policy (above): before, nothing asked the upstream not to
    # code, so every client sending accept-encoding: gzip (every browser) to an upstream
    # that compresses event streams got the failure instead of its answer.
    assert "request" in POLICY.definition.phases
    policy = construct(POLICY, {"builtins": ["email"]})
    identity = RequestModifications(set_headers={"accept-encoding": "identity"})
    assert policy.static_request() == identity
    assert policy.on_request(make_request_context(headers={"accept-encoding": "gzip"})) == identity
