"""Through a real Envoy: the HTTP ext_proc transport (``http_service``), beside gRPC.

Response phase, immediate responses and dynamic metadata over both transports; the state a
request carries between its phases; which route-key sources Envoy 1.36 sends over HTTP;
routes whose chains read bodies; the split configuration (header routes over HTTP, body
routes over gRPC); failure semantics (engine down, 5xx, malformed JSON, slow).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from engine.envoy_metadata import EnvoyMetadata
from tests.e2e.harness import (
    HOST,
    HTTP_CLUSTER,
    access_log_lines,
    file_access_log,
    http_request,
)

pytestmark = pytest.mark.envoy


def policy(name: str, **parameters: Any) -> dict[str, Any]:
    return {"name": name, "version": "v1.0.0", "parameters": parameters}


def writer(value: str) -> dict[str, Any]:
    return policy("addHeader", header="x-added", value=value, metadataKey="user")


def test_response_phase_sees_request_metadata_and_sets_status(e2e_both):
    e2e_both.configure(
        {
            "meta": {
                "policies": [
                    writer("alice"),
                    policy("metadataReader", key="user"),
                    policy("statusSetter", status=201, removeHeader="x-echo-cookies"),
                ]
            }
        }
    )
    reply = e2e_both.request("/meta/x")
    assert reply.status == 201
    assert reply.headers["x-meta-user"] == "alice"
    assert json.loads(reply.body)["headers"]["x-added"] == "alice"


def test_each_request_carries_its_own_state(e2e_both):
    """Concurrent requests on one route never see each other's metadata."""
    e2e_both.configure(
        {
            "meta": {
                "policies": [
                    {**writer("from-header"), "condition": '"x-user" in request.headers'},
                    policy("metadataReader", key="user"),
                ]
            }
        }
    )
    results: dict[int, str] = {}

    def one(i: int) -> None:
        headers = {"x-user": str(i)} if i % 2 else {}
        results[i] = e2e_both.request("/meta/r", headers=headers).headers["x-meta-user"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: ("from-header" if i % 2 else "<none>") for i in range(20)}


def test_client_cannot_forge_the_carried_state(e2e_both):
    """The state namespace is dynamic metadata: a client's headers cannot write it."""
    e2e_both.configure({"meta": {"policies": [policy("metadataReader", key="user")]}})
    forged = {
        "policy_engine.http_state": '{"s": "forged"}',
        "x-envoy-dynamic-metadata": "policy_engine.http_state",
        "user": "mallory",
    }
    reply = e2e_both.request("/meta/f", headers=forged)
    assert reply.status == 200
    assert reply.headers["x-meta-user"] == "<none>"


def test_immediate_response_and_envoy_metadata_over_http(stack):
    stack.configure({"private": {"policies": [policy("deny")]}})
    with stack.other_envoy(transport="http") as envoy:
        reply = http_request(envoy.port, "/api/v1/private/x")
    assert reply.status == 401
    assert reply.json() == {"error": "denied"}


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_dynamic_metadata_reaches_envoy_over_both_transports(stack, transport, tmp_path):
    """The decisions the engine sends as dynamic metadata reach Envoy's access log alike."""
    stack.configure({"meta": {"policies": [writer("carol")]}})
    access_log = tmp_path / f"access-{transport}.log"
    processor = stack.engine.processor
    processor.envoy_metadata = EnvoyMetadata(keys=("user",))
    try:
        with stack.other_envoy(
            transport=transport,
            http_connection_manager=file_access_log(
                access_log, "user=%DYNAMIC_METADATA(policy_engine:user)%\n"
            ),
        ) as envoy:
            assert http_request(envoy.port, "/meta/x").status == 200
            access_log_lines(access_log, lambda lines: any("user=" in x for x in lines))
    finally:
        processor.envoy_metadata = None
    assert access_log.read_text().splitlines() == ["user=carol"]


def test_route_needing_a_body_is_refused_over_http(e2e_both):
    e2e_both.configure({"body": {"policies": [policy("bodyUpper")]}})
    before = len(e2e_both.upstream.requests_to("/body/"))
    reply = e2e_both.request("/body/x", method="POST", body=b"hello")
    if e2e_both.envoy is e2e_both.envoys["grpc"]:
        assert reply.status == 200
        assert b'"BODY": "HELLO"' in reply.body  # bodyUpper runs on both bodies
        return
    assert reply.status == 500
    assert len(e2e_both.upstream.requests_to("/body/")) == before, "body policies never skipped"


def test_split_configuration_routes_each_route_to_one_transport(stack):
    stack.configure(
        {
            "body": {"policies": [policy("bodyUpper")]},
            "meta": {"policies": [writer("bob"), policy("metadataReader", key="user")]},
        }
    )
    with stack.other_envoy(transport="split", grpc_routes=["body"]) as envoy:
        body = http_request(envoy.port, "/body/x", method="POST", body=b"split")
        header = http_request(envoy.port, "/meta/x")
        grpc_calls = envoy.stat("cluster.ext_proc.upstream_rq_total")
        http_calls = envoy.stat(f"cluster.{HTTP_CLUSTER}.upstream_rq_total")
    assert (body.status, b'"BODY": "SPLIT"' in body.body) == (200, True)
    assert (header.status, header.headers["x-meta-user"]) == (200, "bob")
    assert grpc_calls == 1, "only the body route went over gRPC"
    assert http_calls == 2, "the header route's two phases went over HTTP"


# -- what Envoy sends over HTTP -------------------------------------------------------------


class FakeEngine:
    """An HTTP ext_proc server that misbehaves on purpose (``mode``), recording POSTs."""

    def __init__(self) -> None:
        self.mode = "record"
        self.posts: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = b""
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    while size := int(self.rfile.readline().strip() or b"0", 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                kind = "request_headers" if b"request_headers" in body else "response_headers"
                status, payload = 200, json.dumps({kind: {}}).encode()
                if outer.mode == "503":
                    status, payload = 503, b"unavailable"
                elif outer.mode == "malformed":
                    payload = b'{"request_headers": {"response": '
                elif outer.mode == "slow":
                    time.sleep(1.5)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeEngine]:
    engine = FakeEngine()
    try:
        yield engine
    finally:
        engine.close()


def test_route_key_sources_over_http(stack, fake):
    """Which route-key sources reach the server: the ``xds.route_name`` attribute does;
    ``http_service.request_headers_to_add`` and per-route ``grpc_initial_metadata`` do not
    (Envoy 1.36.4)."""
    settings = {
        "http_service": {
            "request_headers_to_add": [{"header": {"key": "x-policy-route", "value": "k"}}]
        }
    }
    with stack.other_envoy(
        transport="http", http_engine_port=fake.port, ext_proc=settings
    ) as envoy:
        assert http_request(envoy.port, "/api/v1/public/x").status == 200
    (headers, body), *_ = fake.posts
    assert "x-policy-route" not in headers
    message = json.loads(body)
    assert message["attributes"]["envoy.filters.http.ext_proc"]["xds.route_name"] == "public"
    assert "public" not in json.dumps(message["request_headers"]).lower()


@pytest.mark.parametrize(
    ("mode", "status"),
    [("down", 500), ("503", 500), ("malformed", 500), ("slow", 504)],
    ids=["engine-down", "answers-503", "malformed-json", "slow-past-message-timeout"],
)
@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_failures_fail_closed_unless_configured_open(stack, fake, mode, status, fail_open):
    fake.mode = mode
    port = fake.port
    if mode == "down":
        fake.close()
    settings = {"failure_mode_allow": fail_open}
    with stack.other_envoy(
        transport="http", http_engine_port=port, ext_proc=settings, message_timeout=0.5
    ) as envoy:
        before = len(stack.upstream.requests_to("/api/v1/public/x"))
        reply = http_request(envoy.port, "/api/v1/public/x", timeout=30)
        reached = len(stack.upstream.requests_to("/api/v1/public/x")) - before
    if fail_open:
        assert (reply.status, reached) == (200, 1)
    else:
        assert reply.status == status
        assert reached == 0, "nothing reaches the upstream unpoliced"
