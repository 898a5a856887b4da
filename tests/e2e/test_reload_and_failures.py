"""Through a real Envoy: hot reload under traffic, invalid config rejected, policy failures
(failOpen / failClosed, raise / timeout), and ext_proc protocol errors isolated per stream."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest

from engine.transport.testing import ExtProcClient, request_body, request_headers, response_headers

pytestmark = pytest.mark.envoy


def version_chain(version: str) -> dict[str, Any]:
    return {
        "reload": {
            "policies": [
                {
                    "name": "addHeader",
                    "version": "v1.0.0",
                    "parameters": {"header": "x-version", "value": version},
                }
            ]
        }
    }


def test_hot_reload_under_traffic_has_zero_failures(e2e):
    e2e.configure(version_chain("v1"))
    results: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            try:
                reply = e2e.request("/reload/x", timeout=5)
                results.append((reply.status, reply.echo["headers"].get("x-version", "")))
            except BaseException as exc:  # every failure counts
                errors.append(exc)

    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while len(results) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        e2e.configure(version_chain("v2"))
        switched = len(results)
        while len(results) < switched + 20 and time.monotonic() < deadline + 5:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(10)
    assert not errors
    assert all(status == 200 for status, _ in results)
    versions = [v for _, v in results]
    assert versions[0] == "v1"
    assert versions[-1] == "v2"
    # Copy-on-write: once v2 appeared, v1 never came back (one engine, one store).
    first_v2 = versions.index("v2")
    assert set(versions[first_v2:]) == {"v2"}
    assert set(versions) == {"v1", "v2"}


def test_invalid_config_is_rejected_and_old_config_keeps_serving(e2e, caplog):
    e2e.configure(version_chain("good"))
    before = e2e.engine.store.current
    e2e.write_raw(
        "routes:\n  reload:\n    policies:\n      - {name: noSuchPolicy, version: v1.0.0}\n"
    )
    time.sleep(0.3)  # several polls
    assert e2e.engine.store.current is before
    assert "noSuchPolicy" in caplog.text
    reply = e2e.request("/reload/x")
    assert reply.status == 200
    assert reply.echo["headers"]["x-version"] == "good"


@pytest.mark.parametrize(
    ("failing", "on_error", "status", "later_ran"),
    [
        pytest.param({"name": "raiser"}, "failOpen", 200, True, id="raise-failOpen"),
        pytest.param({"name": "raiser"}, "failClosed", 503, False, id="raise-failClosed"),
        pytest.param(
            {"name": "sleeper", "parameters": {"seconds": 1}, "timeout": "100ms"},
            "failOpen",
            200,
            True,
            id="timeout-failOpen",
        ),
        pytest.param(
            {"name": "sleeper", "parameters": {"seconds": 1}, "timeout": "100ms"},
            "failClosed",
            503,
            False,
            id="timeout-failClosed",
        ),
    ],
)
def test_policy_failures(e2e, failing, on_error, status, later_ran):
    entry = {"version": "v1.0.0", "onError": on_error, "errorStatus": 503, **failing}
    later = {
        "name": "addHeader",
        "version": "v1.0.0",
        "parameters": {"header": "x-later", "value": "1"},
    }
    e2e.configure({"fail": {"policies": [entry, later]}})
    before = len(e2e.upstream.requests_to("/fail/"))
    started = time.monotonic()
    reply = e2e.request("/fail/x")
    assert time.monotonic() - started < 1.0, "the timeout must cut the policy short"
    assert reply.status == status
    upstream = e2e.upstream.requests_to("/fail/")
    if later_ran:
        assert upstream[-1].headers["x-later"] == "1"
        assert "x-slept" not in upstream[-1].headers
    else:
        assert len(upstream) == before
        assert reply.json()["error"].startswith("policy ")


@pytest.mark.parametrize(
    "buffered", [pytest.param(False, id="headers"), pytest.param(True, id="buffered-body")]
)
def test_response_phase_failure_fails_closed(e2e, buffered):
    raiser = {
        "name": "raiser",
        "version": "v1.0.0",
        "condition": "has(response.status)",  # only in the response phase
        "onError": "failClosed",
        "errorStatus": 502,
    }
    chain = [raiser]
    if buffered:
        chain.insert(0, {"name": "respBodyUpper", "version": "v1.0.0"})
    e2e.configure({"fail": {"policies": chain}})
    reply = e2e.request("/fail/response")
    assert reply.status == 502
    assert reply.json() == {"error": "policy raiser v1.0.0 failed"}
    assert e2e.upstream.requests_to("/fail/response"), "the request phase reached upstream"


def test_malformed_stream_fails_alone(e2e):
    """A bad ext_proc stream is aborted with INVALID_ARGUMENT; a concurrent request through
    Envoy (slow chain, so it overlaps) is unaffected."""
    e2e.configure(
        {
            "fail": {
                "policies": [
                    {"name": "sleeper", "version": "v1.0.0", "parameters": {"seconds": 0.3}}
                ]
            }
        }
    )
    outcome: dict[str, Any] = {}

    def normal() -> None:
        outcome["reply"] = e2e.request("/fail/concurrent")

    thread = threading.Thread(target=normal)
    thread.start()

    async def malformed() -> list[tuple[grpc.StatusCode, str]]:
        found = []
        async with ExtProcClient(e2e.engine.target) as client:
            for messages in (
                [response_headers(200)],
                [request_body(b"x")],
                [request_headers("/fail/x"), request_headers("/fail/x")],
            ):
                stream = client.open("fail")
                try:
                    for message in messages:
                        await stream.send(message)
                except grpc.aio.AioRpcError as exc:
                    found.append((exc.code(), exc.details() or ""))
                finally:
                    stream.cancel()
        return found

    try:
        found = asyncio.run(malformed())
    finally:
        thread.join(10)
    assert [code for code, _ in found] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert "response_headers before request_headers" in found[0][1]
    assert "request_body before request_headers" in found[1][1]
    assert "second request_headers" in found[2][1]
    reply = outcome["reply"]
    assert reply.status == 200
    assert reply.echo["headers"]["x-slept"] == "yes"
