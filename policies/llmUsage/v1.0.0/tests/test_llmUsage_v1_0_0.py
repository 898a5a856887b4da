"""Tests of llmUsage v1.0.0: usage from a JSON body and from the SSE usage event."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.policy import RequestModifications
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
USAGE = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
EXPECTED = {
    "llmUsage.promptTokens": 12,
    "llmUsage.completionTokens": 30,
    "llmUsage.totalTokens": 42,
    "llmUsage.model": "gpt-test",
}


def usage_of(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k.startswith("llmUsage.")}


def sse(*objects: object) -> list[bytes]:
    events = [f"data: {json.dumps(o)}\n\n".encode() for o in objects]
    return [*events, b"data: [DONE]\n\n"]


def test_definition_examples_behave_as_declared() -> None:
    assert POLICY.check_examples() == []


@pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
def test_valid_examples_construct(example: Mapping[str, Any]) -> None:
    construct(POLICY, example["parameters"])


async def test_usage_from_the_final_sse_event_with_the_body_untouched() -> None:
    chunks = [{"model": "gpt-test", "choices": [{"delta": {"content": "hi"}}]}] * 3
    pieces = sse(*chunks, {"model": "gpt-test", "choices": [], "usage": USAGE})
    # Cut the stream at odd places: the usage event arrives in two pieces.
    body = b"".join(pieces)
    cut = body.index(b"prompt_tokens")
    ctx = make_response_context(headers={"content-type": "text/event-stream"})
    out = await stream_body(construct(POLICY, {}), ctx, [body[:cut], body[cut:], b""])
    assert out.body == body
    assert usage_of(ctx.metadata) == EXPECTED


async def test_usage_from_a_json_body_passed_on_as_it_comes() -> None:
    body = json.dumps({"model": "gpt-test", "choices": [], "usage": USAGE}).encode()
    ctx = make_response_context(headers={"content-type": "application/json"})
    out = await stream_body(construct(POLICY, {}), ctx, [body[:10], body[10:], b""])
    assert out.pieces == [body[:10], body[10:], b""]  # nothing held back
    assert usage_of(ctx.metadata) == EXPECTED


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"usage": "many"}', b'{"usage": {"total_tokens": -1}}', b"[1]"],
    ids=["not-json", "usage-not-object", "negative", "array"],
)
async def test_no_usage_is_no_failure(body: bytes) -> None:
    ctx = make_response_context(headers={"content-type": "application/json"})
    out = await stream_body(construct(POLICY, {}), ctx, [body, b""])
    assert out.immediate is None
    assert out.body == body
    assert not {k for k in usage_of(ctx.metadata) if k != "llmUsage.model"}


async def test_json_body_over_the_limit_is_not_read() -> None:
    body = json.dumps({"usage": USAGE, "pad": "x" * 2000}).encode()
    ctx = make_response_context(headers={"content-type": "application/json"})
    out = await stream_body(construct(POLICY, {"maxBodyBytes": 1024}), ctx, [body, b""])
    assert out.body == body
    assert usage_of(ctx.metadata) == {}


def test_buffered_bodies_are_read_whole() -> None:
    policy = construct(POLICY, {})
    body = json.dumps({"model": "gpt-test", "usage": USAGE}).encode()
    ctx = make_response_context(headers={"content-type": "application/json"}, body=body)
    assert policy.on_response(ctx) is None
    assert usage_of(ctx.metadata) == EXPECTED
    stream = b"".join(sse({"model": "gpt-test", "usage": USAGE}))
    ctx = make_response_context(headers={"content-type": "text/event-stream"}, body=stream)
    policy.on_response(ctx)
    assert usage_of(ctx.metadata) == EXPECTED


def test_other_content_types_are_left_alone() -> None:
    ctx = make_response_context(headers={"content-type": "text/plain"})
    assert construct(POLICY, {}).response_framing(ctx) is None


def test_every_request_asks_for_an_uncoded_answer() -> None:
    # Before: the policy had no request phase; a client sending accept-encoding: gzip got
    # a gzip answer from a compressing upstream, which yields no usage, so rateLimit's
    # costMetadataKey: llmUsage.totalTokens charged nothing (a token budget bypassed).
    assert "request" in POLICY.definition.phases
    policy = construct(POLICY, {})
    identity = RequestModifications(set_headers={"accept-encoding": "identity"})
    assert policy.static_request() == identity
    ctx = make_request_context(headers={"accept-encoding": "gzip, br"})
    assert policy.on_request(ctx) == identity
