"""Through a real Envoy: the engine fails closed where a bad value, a missing chain, a
misconfigured Envoy or an oversized body could otherwise let a request through unpoliced
(issue 8: items 3, 4, 5, 9, 10, 11)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.harness import http_request

pytestmark = pytest.mark.envoy


def policy(name: str, **parameters: Any) -> dict[str, Any]:
    return {"name": name, "version": "v1.0.0", "parameters": parameters}


def test_unencodable_header_value_fails_closed_even_with_failure_mode_allow(e2e):
    # The chain removes a client-sent x-jwt-sub, then sets it to a lone surrogate. Before,
    # building the reply raised out of Process; with failure_mode_allow Envoy then passed
    # the request on unmodified, spoofed header included.
    e2e.configure({"public": {"policies": [policy("unencodable", header="x-jwt-sub")]}})
    before = len(e2e.upstream.requests_to("/api/v1/public/spoof"))
    with e2e.other_envoy(ext_proc={"failure_mode_allow": True}) as envoy:
        reply = http_request(envoy.port, "/api/v1/public/spoof", headers={"x-jwt-sub": "admin"})
    assert reply.status == 500
    assert reply.json() == {"error": "policy unencodable v1.0.0 failed"}
    assert len(e2e.upstream.requests_to("/api/v1/public/spoof")) == before
