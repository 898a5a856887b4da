"""controlplane.metrics through a running control plane: /metrics counts pushes, each
engine's ACKs and NACKs, admin changes by role and result, and shows connected engines and
which engine rejects the current version; --metrics-listen's loopback rule."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.main import parse_args
from controlplane.metrics import MAX_NODES, OTHER_NODE, ControlPlaneMetrics
from controlplane.testing import ControlPlane, FakeEngine
from engine.tls_testing import TestPki
from tests.support import registry_from

ROUTE = {"policies": [{"name": "addHeader", "version": "v1.0.0",
                       "parameters": {"header": "x-a", "value": "1"}}]}  # fmt: skip
BAD = {"policies": [{"name": "addHeader", "version": "v1.0.0", "parameters": {}}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def admin(plane: ControlPlane, method: str, path: str, body: Any, token: str) -> int:
    def run() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", plane.admin_port, timeout=10)
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request(method, path, body=json.dumps(body), headers=headers)
            reply = conn.getresponse()
            reply.read()
            return reply.status
        finally:
            conn.close()

    return await asyncio.to_thread(run)


async def test_metrics_of_a_running_control_plane() -> None:
    port = free_port()
    plane = ControlPlane(registry_from("addHeader"), metrics_listen=f"127.0.0.1:{port}")
    await plane.start()
    good, bad = FakeEngine(plane.xds_port, "edge-1"), FakeEngine(plane.xds_port, "edge-2")
    try:
        await good.connect()
        await bad.connect()
        await good.next_version()
        await good.ack()
        await bad.next_version()
        await bad.ack()
        assert await admin(plane, "PUT", "/routes/api", ROUTE, plane.admin_token) == 200
        await good.next_version()
        await good.ack()
        await bad.next_version()
        await bad.nack("routes[api]: unknown policy addHeader v1.0.0")
        assert await admin(plane, "PUT", "/routes/api", BAD, plane.admin_token) == 400
        assert await admin(plane, "PUT", "/routes/api", ROUTE, plane.reader_token) == 403
        assert await admin(plane, "DELETE", "/routes/api", None, "") == 401

        # One verdict per response answered: each version is a routes and a settings one.
        expected = {("edge-1", "ACK"): 4, ("edge-1", "NACK"): 0, ("edge-2", "ACK"): 2,
                    ("edge-2", "NACK"): 2}  # fmt: skip
        found = await wait_for_verdicts(port, expected)
        assert verdicts(found, expected) == expected
        p = "policy_controlplane_"
        assert found[(p + "xds_pushes_total", (("type", "routes"),))] == 4
        assert found[(p + "xds_pushes_total", (("type", "settings"),))] == 4
        assert found[(p + "engines_connected", ())] == 2
        assert found[(p + "engine_config_current", (("node", "edge-1"),))] == 1
        assert found[(p + "engine_config_current", (("node", "edge-2"),))] == 0
        assert found[(p + "engine_rejecting", (("node", "edge-1"),))] == 0
        assert found[(p + "engine_rejecting", (("node", "edge-2"),))] == 1
        changes = p + "admin_changes_total"
        assert found[(changes, (("result", "applied"), ("role", "read-write")))] == 1
        assert found[(changes, (("result", "invalid"), ("role", "read-write")))] == 1
        assert found[(changes, (("result", "forbidden"), ("role", "read-only")))] == 1
        assert found[(changes, (("result", "unauthenticated"), ("role", "none")))] == 1
        assert found[(p + "config_generation", ())] == 1
        await bad.close()
        for _ in range(100):
            found = await asyncio.to_thread(scrape, port)
            if found[(p + "engines_connected", ())] == 1:
                break
            await asyncio.sleep(0.05)
        assert found[(p + "engines_connected", ())] == 1
        assert (p + "engine_rejecting", (("node", "edge-2"),)) not in found
    finally:
        await good.close()
        await bad.close()
        assert await plane.stop() == 0


def verdicts(
    found: dict[Any, float], wanted: dict[tuple[str, str], int]
) -> dict[tuple[str, str], float | None]:
    """The ``xds_responses_total`` sample of each ``(node, result)`` of ``wanted``."""
    name = "policy_controlplane_xds_responses_total"
    return {
        (node, result): found.get((name, (("node", node), ("result", result))))
        for node, result in wanted
    }


async def wait_for_verdicts(port: int, wanted: dict[tuple[str, str], int]) -> dict[Any, float]:
    """Scrape until the verdict counts are ``wanted`` (5 s at most); the last scrape."""
    found = await asyncio.to_thread(scrape, port)
    for _ in range(100):
        if verdicts(found, wanted) == wanted:
            break
        await asyncio.sleep(0.05)
        found = await asyncio.to_thread(scrape, port)
    return found


async def test_a_version_counts_as_many_acks_as_nacks() -> None:
    """Each response answered is one verdict, ACK or NACK alike: an accepted version
    counts two ACKs (routes and settings), a rejected one two NACKs, and together they
    are the responses pushed. (ACKs used to be counted for routes responses only.)"""
    port = free_port()
    plane = ControlPlane(registry_from("addHeader"), metrics_listen=f"127.0.0.1:{port}")
    await plane.start()
    engine = FakeEngine(plane.xds_port, "edge-1")
    try:
        await engine.connect()
        await engine.next_version()
        await engine.ack()
        assert await admin(plane, "PUT", "/routes/api", ROUTE, plane.admin_token) == 200
        await engine.next_version()
        await engine.nack("routes[api]: unknown policy addHeader v1.0.0")
        expected = {("edge-1", "ACK"): 2, ("edge-1", "NACK"): 2}
        found = await wait_for_verdicts(port, expected)
        assert verdicts(found, expected) == expected
        pushed = sum(
            found[("policy_controlplane_xds_pushes_total", (("type", kind),))]
            for kind in ("routes", "settings")
        )
        assert pushed == 4
    finally:
        await engine.close()
        assert await plane.stop() == 0


def test_node_labels_are_bounded() -> None:
    metrics = ControlPlaneMetrics()
    for i in range(MAX_NODES):
        assert metrics.node_label(f"n{i}") == f"n{i}"
    assert metrics.node_label("one-too-many") == OTHER_NODE
    assert metrics.node_label("n0") == "n0"


BASE = ["--definitions", "d.json", "--admin-no-auth"]


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        pytest.param(["--metrics-listen", "127.0.0.1:9100"], True, id="loopback"),
        pytest.param(["--metrics-listen", "0.0.0.0:9100"], False, id="wildcard-refused"),
        pytest.param(
            ["--metrics-listen", "0.0.0.0:9100", "--metrics-insecure"], True, id="insecure-said"
        ),
        pytest.param(
            [
                "--metrics-listen",
                "0.0.0.0:9100",
                "--xds-cert",
                "c",
                "--xds-key",
                "k",
                "--xds-client-ca",
                "ca",
            ],
            True,
            id="mtls",
        ),
        pytest.param(["--metrics-listen", "9100"], False, id="no-host"),
    ],
)
def test_metrics_listen_beyond_loopback_needs_mtls(
    extra: list[str], ok: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if ok:
        assert parse_args(BASE + extra).metrics_listen == extra[1]
        return
    with pytest.raises(SystemExit) as exited:
        parse_args(BASE + extra)
    assert exited.value.code == 2
    assert "--metrics-listen" in capsys.readouterr().err


async def test_metrics_over_mtls_with_the_ads_files(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    server = pki.server("controlplane")
    port = free_port()
    plane = ControlPlane(
        registry_from("addHeader"),
        xds_cert=server.cert,
        xds_key=server.key,
        xds_client_ca=pki.ca_file,
        metrics_listen=f"127.0.0.1:{port}",
    )
    await plane.start()
    try:
        prometheus = pki.client("prometheus")
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        context.load_cert_chain(str(prometheus.cert), str(prometheus.key))

        def get(ctx: ssl.SSLContext) -> bytes:
            conn = http.client.HTTPSConnection("localhost", port, timeout=5, context=ctx)
            try:
                conn.request("GET", "/metrics")
                return conn.getresponse().read()
            finally:
                conn.close()

        assert b"policy_controlplane_engines_connected" in await asyncio.to_thread(get, context)
        anonymous = ssl.create_default_context(cafile=str(pki.ca_file))
        with pytest.raises((OSError, http.client.HTTPException)):
            await asyncio.to_thread(get, anonymous)  # no client certificate: refused
    finally:
        assert await plane.stop() == 0
