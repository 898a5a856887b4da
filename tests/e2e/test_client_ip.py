"""Through a real Envoy: ``keyBy: clientIp`` keys on the address Envoy established, never on
an ``x-forwarded-for`` the client wrote (issue 16, item 11)."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.envoy

VERSIONS = [pytest.param("v1.0.0", id="v1"), pytest.param("v2.0.0", id="v2")]


def limit(version: str) -> dict[str, Any]:
    return {
        "name": "rateLimit",
        "version": version,
        "parameters": {"requestsPerSecond": 0.01, "burstSize": 1},
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_a_client_writing_x_forwarded_for_cannot_escape_its_limit(e2e, version):
    # Envoy at the edge, as its docs require there (use_remote_address: true), with
    # source.address in request_attributes (the harness's filter config).
    e2e.configure({"cel": {"policies": [limit(version)]}})
    with e2e.other_envoy(http_connection_manager={"use_remote_address": True}) as envoy:
        statuses = [
            e2e_request(envoy.port, f"/cel/{version}/{i}", {"x-forwarded-for": f"203.0.113.{i}"})
            for i in range(4)
        ]
    assert statuses == [200, 429, 429, 429]


@pytest.mark.parametrize("version", VERSIONS)
def test_without_the_source_address_attribute_clientip_fails_closed(e2e, version):
    # Before: the engine took the last x-forwarded-for hop, which the client wrote here
    # (Envoy appends nothing with use_remote_address false): a new bucket per request.
    e2e.configure({"cel": {"policies": [limit(version)]}})
    before = len(e2e.upstream.requests_to(f"/cel/{version}/noattr"))
    with e2e.other_envoy(ext_proc={"request_attributes": ["xds.route_name"]}) as envoy:
        statuses = [
            e2e_request(
                envoy.port, f"/cel/{version}/noattr/{i}", {"x-forwarded-for": f"203.0.113.{i}"}
            )
            for i in range(3)
        ]
    assert statuses == [500, 500, 500]
    assert len(e2e.upstream.requests_to(f"/cel/{version}/noattr")) == before


def e2e_request(port: int, path: str, headers: dict[str, str]) -> int:
    from tests.e2e.harness import http_request

    return http_request(port, path, headers=headers).status
