"""Per-policy timing (``debug: {timing: true}``, engine/timing.py) through a real grpc.aio
server: the routes come from a config document loaded with the real test policies."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.config import load_config
from engine.envoy_metadata import EnvoyMetadata
from engine.store import ConfigStore
from engine.timing import TIMING_HEADER, TIMING_KEY
from engine.transport.grpc_service import PolicyProcessor
from engine.transport.testing import (
    ExtProcClient,
    decode,
    request_headers,
    response_headers,
    serving,
)
from tests.support import registry_from

_CONFIG = """
routes:
  timed:
    debug: {timing: true}
    policies:
      - {name: addHeader, version: v1.0.0, parameters: {header: x-a, value: "1"}}
      - name: addHeader
        version: v1.0.0
        condition: 'request.path == "/never"'
        parameters: {header: x-b, value: "2"}
  timed-response:
    debug: {timing: true}
    policies:
      - {name: addHeader, version: v1.0.0, parameters: {header: x-a, value: "1"}}
      - {name: statusSetter, version: v1.0.0, parameters: {status: 203}}
  timed-deny:
    debug: {timing: true}
    policies:
      - {name: addHeader, version: v1.0.0, parameters: {header: x-a, value: "1"}}
      - {name: deny, version: v1.0.0, parameters: {status: 403}}
  timed-empty:
    debug: {timing: true}
    policies: []
  untimed:
    debug: {timing: false}
    policies:
      - {name: addHeader, version: v1.0.0, parameters: {header: x-a, value: "1"}}
"""

_ENTRY = r"[A-Za-z]+(;desc=[a-z\" ]+)?;dur=\d+\.\d{3}"


def _entries(value: str) -> list[str]:
    parts = value.split(", ")
    for part in parts:
        assert re.fullmatch(_ENTRY, part), part
    return [part.split(";")[0] + (";response" if "desc=response" in part else "") for part in parts]


@pytest.fixture
async def target() -> AsyncIterator[str]:
    registry = registry_from("addHeader", "deny", "statusSetter")
    store = ConfigStore(load_config(_CONFIG, source="timing.yaml", registry=registry))
    processor = PolicyProcessor(store, envoy_metadata=EnvoyMetadata())
    async with serving(store, processor, within=30) as target:
        yield target


def _metadata(reply: Any) -> dict[str, Any]:
    fields = reply.dynamic_metadata.fields
    if "policy_engine" not in fields:
        return {}
    return {k: v.string_value for k, v in fields["policy_engine"].struct_value.fields.items()}


async def test_timed_route_sends_header_and_metadata(target: str) -> None:
    async with ExtProcClient(target) as client:
        replies = await client.exchange("timed", [request_headers("/x"), response_headers(200)])
    assert len(replies) == 2, "a timed route asks for the response headers"
    request, response = decode(replies[0]), decode(replies[1])
    assert request.set_headers == {"x-a": "1"}
    assert decode(replies[0]).modes is not None
    assert request.modes["response_header_mode"] == "SEND"  # type: ignore[index]
    value = response.set_headers[TIMING_HEADER]
    # Both entries are timed, the one whose condition is false too.
    assert _entries(value) == ["addHeader", "addHeader"]
    assert _metadata(replies[1])[TIMING_KEY] == value
    assert _metadata(replies[0])[TIMING_KEY].count("addHeader") == 2


async def test_response_phase_entries_are_marked(target: str) -> None:
    async with ExtProcClient(target) as client:
        replies = await client.exchange(
            "timed-response", [request_headers("/x"), response_headers(200)]
        )
    response = decode(replies[1])
    assert response.set_headers[":status"] == "203"
    assert _entries(response.set_headers[TIMING_HEADER]) == ["addHeader", "statusSetter;response"]


async def test_immediate_response_carries_the_header(target: str) -> None:
    async with ExtProcClient(target) as client:
        replies = await client.exchange("timed-deny", [request_headers("/x")])
    reply = decode(replies[0])
    assert reply.kind == "immediate_response"
    assert reply.status == 403
    assert _entries(reply.set_headers[TIMING_HEADER]) == ["addHeader", "deny"]
    assert TIMING_KEY in _metadata(replies[0])


@pytest.mark.parametrize("route", ["timed-empty", "untimed"])
async def test_no_header_without_timing_or_policies(target: str, route: str) -> None:
    async with ExtProcClient(target) as client:
        replies = await client.exchange(route, [request_headers("/x"), response_headers(200)])
    assert len(replies) == 1, "no response phase is asked for"
    reply = decode(replies[0])
    assert TIMING_HEADER not in reply.set_headers
    assert TIMING_KEY not in _metadata(replies[0])
