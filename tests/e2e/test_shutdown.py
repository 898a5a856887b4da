"""Through a real Envoy health-checking the engine: shutdown reports NOT_SERVING first and
keeps serving for the drain period (issue 8 item 15)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import config_text
from tests.e2e.harness import EngineThread, HttpResponse, http_request

pytestmark = pytest.mark.envoy

HEALTH_CHECKED = {
    "health_checks": [
        {
            "timeout": "0.5s",
            "interval": "0.1s",
            "no_traffic_interval": "0.1s",  # default 60 s while the cluster is idle
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
        }
    ]
}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_shutdown_reports_not_serving_while_streams_still_succeed(stack, tmp_path: Path):
    # Before: NOT_SERVING and server.stop(grace) happened at once, so Envoy's health check
    # could not see NOT_SERVING while the engine still served: requests sent after the stop
    # began failed (500) instead of being served while traffic moved away.
    config = tmp_path / "drain.yaml"
    add = {
        "name": "addHeader",
        "version": "v1.0.0",
        "parameters": {"header": "x-drain", "value": "1"},
    }
    config.write_text(config_text({"public": {"policies": [add]}}))
    engine = EngineThread(stack.registry, config, drain=3.0)
    try:
        with stack.other_envoy(engine_port=engine.port, engine_cluster=HEALTH_CHECKED) as envoy:
            healthy = "cluster.ext_proc.membership_healthy"
            wait_for(lambda: envoy.stat(healthy) == 1, 10, "the engine to be healthy in Envoy")
            first = http_request(envoy.port, "/api/v1/public/a")
            assert first.echo is not None
            assert first.echo["headers"]["x-drain"] == "1"
            failures = envoy.stat("cluster.ext_proc.health_check.failure")
            engine.request_stop()
            wait_for(lambda: envoy.stat(healthy) == 0, 2, "Envoy to see NOT_SERVING")
            assert envoy.stat("cluster.ext_proc.health_check.failure") > failures
            assert engine.running
            # Still serving during the drain (Envoy's panic routing sends to the only host).
            reply = http_request(envoy.port, "/api/v1/public/b")
            assert reply.status == 200
            assert reply.echo is not None
            assert reply.echo["headers"]["x-drain"] == "1"
    finally:
        engine.close()


def test_a_request_in_flight_at_stop_finishes_with_its_policies(stack, tmp_path: Path):
    # Issue 16 item 15, through Envoy: the engine is told to stop (no drain) while a policy
    # of a request in flight still runs. The request finishes with both phases policed and
    # Envoy sees its ext_proc stream end OK. This passes on the old stop sequence too (Envoy
    # writes nothing right behind the last reply here); the race it had, a peer losing the
    # OK status because gRPC core closed the connection right behind it, is pinned in
    # tests/extproc/test_extproc.py (test_stop_closes_connections_only_after_...).
    config = tmp_path / "stop.yaml"
    sleeper = {"name": "sleeper", "version": "v1.0.0", "parameters": {"seconds": 0.5}}
    config.write_text(config_text({"public": {"policies": [sleeper]}}))
    engine = EngineThread(stack.registry, config, grace=10.0)
    try:
        with stack.other_envoy(engine_port=engine.port) as envoy:
            replies: list[HttpResponse] = []
            client = threading.Thread(
                target=lambda: replies.append(
                    http_request(envoy.port, "/api/v1/public/stop", timeout=15)
                )
            )
            client.start()
            stats = engine.processor.stats
            wait_for(lambda: stats.count("request_headers") == 1, 10, "the request's stream")
            engine.request_stop()
            client.join(15)
            [reply] = replies
            assert reply.status == 200
            assert reply.headers.get("x-slept") == "yes"  # the response phase ran too
            assert reply.echo is not None
            assert reply.echo["headers"]["x-slept"] == "yes"
            assert envoy.stat("http.ingress.ext_proc.streams_failed") == 0
        engine.close()
        assert not engine.running
    finally:
        engine.close()
