"""Issue 20 item 4 through real processes: the admin API's ``?wait=SECONDS`` reports each
engine's ACK, NACK or silence to whoever made the change, and the control plane of an
engine binary refuses a constructor check at submission.

Control plane process -> engine processes (``--xds``) on 127.0.0.1; no Envoy is needed:
the verdicts are the engines'. Under Bazel, ``ENGINE_BINARY`` is a builder-made engine
(``//tests/image/engine:engine``) whose ``controlplane`` command is tested as shipped;
plain pytest runs the same entry (``controlplane.main.main(..., policies=...)``) with
the test engine's code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from controlplane.testing import FakeEngine
from policies.jwtValidation.testing import make_pki
from tests.e2e.xds_harness import (
    ControlPlaneProcess,
    EngineXdsProcess,
    LoopThread,
    write_e2e_definitions,
)

HEADER = {"policies": [{"name": "setHeader", "version": "v1.0.0",
                        "parameters": {"request": {"set": {"x-version": "1"}}}}]}  # fmt: skip
BAD_HEADER = {"policies": [{"name": "setHeader", "version": "v1.0.0",
                            "parameters": {"request": {"set": {"x bad": "1"}}}}]}  # fmt: skip


def jwt_route(ca_file: str) -> dict[str, Any]:
    parameters = {
        "jwksUrl": "https://127.0.0.1:9/jwks.json",
        "issuer": "https://idp.example/",
        "audiences": ["orders"],
        "caFile": ca_file,
    }
    return {"policies": [{"name": "jwtValidation", "version": "v2.0.0", "parameters": parameters}]}


def put_waiting(plane: ControlPlaneProcess, key: str, spec: Any, wait: float) -> dict[str, Any]:
    status, body = plane.call("PUT", f"/routes/{key}?wait={wait:g}", spec, timeout=wait + 10)
    assert status == 200, body
    return dict(body)


def by_node(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["node"]: e for e in body["engines"]}


def connected(plane: ControlPlaneProcess, nodes: set[str]) -> None:
    plane.wait_acked(plane.status()["version"], nodes)


def test_wait_answers_once_both_engines_acked(tmp_path: Path) -> None:
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    with (
        ControlPlaneProcess(definitions, tmp_path) as plane,
        EngineXdsProcess(plane.xds_port, "edge-1", tmp_path),
        EngineXdsProcess(plane.xds_port, "edge-2", tmp_path),
    ):
        connected(plane, {"edge-1", "edge-2"})
        body = put_waiting(plane, "public", HEADER, 20)
        assert body["allAcked"] is True
        engines = by_node(body)
        assert set(engines) == {"edge-1", "edge-2"}
        assert {(e["result"], e["version"]) for e in engines.values()} == {("ACK", body["version"])}
        # What /status says afterwards agrees: no need to poll it.
        acked = {e["node"]: e["ackedVersion"] for e in plane.status()["engines"] if e["connected"]}
        assert acked == {"edge-1": body["version"], "edge-2": body["version"]}


def test_an_engine_rejecting_the_change_is_reported_to_its_maker(tmp_path: Path) -> None:
    """``caFile: ca.pem`` (relative): present where ``has-ca`` runs, missing where
    ``no-ca`` runs. ``no-ca``'s constructor check fails there: its NACK is in the answer."""
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    with_ca, without_ca = tmp_path / "host-with-ca", tmp_path / "host-without-ca"
    without_ca.mkdir()
    with_ca.mkdir()
    make_pki(with_ca)
    with (
        ControlPlaneProcess(definitions, tmp_path) as plane,
        EngineXdsProcess(plane.xds_port, "has-ca", tmp_path, cwd=with_ca),
        EngineXdsProcess(plane.xds_port, "no-ca", tmp_path, cwd=without_ca),
    ):
        connected(plane, {"has-ca", "no-ca"})
        body = put_waiting(plane, "orders", jwt_route("ca.pem"), 20)
        assert body["allAcked"] is False
        engines = by_node(body)
        assert engines["has-ca"]["result"] == "ACK"
        assert engines["no-ca"]["result"] == "NACK"
        error = engines["no-ca"]["nackError"]
        assert "routes[orders]" in error
        assert "caFile: cannot load CA certificates" in error
        assert "nackError" not in engines["has-ca"]


def test_an_engine_that_never_answers_times_out(tmp_path: Path) -> None:
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    loop = LoopThread()
    try:
        with (
            ControlPlaneProcess(definitions, tmp_path) as plane,
            EngineXdsProcess(plane.xds_port, "edge-1", tmp_path),
        ):
            mute = FakeEngine(plane.xds_port, "mute")
            loop.run(mute.connect())
            loop.run(mute.next_version())  # it reads every version and never answers
            connected(plane, {"edge-1"})
            started = time.monotonic()
            body = put_waiting(plane, "public", HEADER, 2)
            assert 2 <= time.monotonic() - started < 8
            assert body["allAcked"] is False
            engines = by_node(body)
            assert (engines["edge-1"]["result"], engines["mute"]["result"]) == ("ACK", "timeout")
            loop.run(mute.close())
    finally:
        loop.close()


def _checking_plane(definitions: Path, workdir: Path) -> ControlPlaneProcess:
    binary = os.environ.get("ENGINE_BINARY")
    if binary:  # under Bazel: the builder-made engine, as shipped
        return ControlPlaneProcess(definitions, workdir, engine=Path.cwd() / binary)
    return ControlPlaneProcess(definitions, workdir, policies=True)


def test_engine_controlplane_refuses_a_bad_header_name_at_submission(tmp_path: Path) -> None:
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    with _checking_plane(definitions, tmp_path) as plane:
        before = plane.status()["version"]
        status, body = plane.call("PUT", "/routes/public?wait=5", BAD_HEADER)
        assert status == 400, body
        assert body["errors"] == [
            "routes[public].policies[0] setHeader v1.0.0: request.set.x bad: "
            "'x bad' is not a valid header name (an HTTP token)"
        ]
        assert plane.status()["version"] == before
        assert "constructor checks at submission for: " in plane.log()
        # A good header goes through, and a constructor needing the engine host is not run.
        assert plane.call("PUT", "/routes/public", HEADER)[0] == 200
        assert plane.call("PUT", "/routes/orders", jwt_route("/nowhere/ca.pem"))[0] == 200
