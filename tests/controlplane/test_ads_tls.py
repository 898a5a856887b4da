"""ADS over mTLS, in-process: the node identity check, and rotation on both sides.

The control plane (``--xds-cert/--xds-key/--xds-client-ca``) and real engine xDS clients
(:class:`~engine.xds.client.XdsConfigSource` with :class:`~engine.tls.ClientTlsFiles`) on
127.0.0.1. Rotations are written as the kubelet writes a secret (engine.tls_testing).
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.main import parse_args
from controlplane.testing import ControlPlane
from engine.registry import PolicyRegistry
from engine.store import ConfigStore
from engine.tls import ClientTlsFiles
from engine.tls_testing import Issued, TestPki
from engine.xds.client import Backoff, XdsConfigSource, make_node
from engine.xds.resources import ROUTE_CHAIN_TYPE
from tests.support import registry_from


def _spec(value: str) -> dict[str, object]:
    return {
        "policies": [
            {
                "name": "addHeader",
                "version": "v1.0.0",
                "parameters": {"header": "x-v", "value": value},
            }
        ]
    }


class Engine:
    """One engine's xDS client (a task on this loop) with mTLS files."""

    def __init__(self, registry: PolicyRegistry, port: int, node_id: str, tls: ClientTlsFiles):
        self.source = XdsConfigSource(
            f"127.0.0.1:{port}",
            registry,
            ConfigStore(),
            node=functools.partial(make_node, node_id, "edge", registry, "0.1.0"),
            backoff=Backoff(base=0.05, maximum=0.2),
            tls=tls,
        )
        self.task = asyncio.create_task(self.source.run())

    async def acked(self, version: str) -> None:
        """Until this engine has ACKed ``version`` (at most 10 s)."""

        async def wait() -> None:
            while True:
                if self.source.status.acked_version == version:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(wait(), 10)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _credentials(ca: Path, client: Issued | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def _ads_status(port: int, ca: Path, client: Issued | None, node_id: str) -> str:
    """One raw ADS stream: ``RESPONSE`` when configuration came back, else the status code."""
    credentials = _credentials(ca, client)
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(timeout=5)
        try:
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    node=base_pb2.Node(id=node_id) if node_id else None, type_url=ROUTE_CHAIN_TYPE
                )
            )
            async for _ in call:
                return "RESPONSE"
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
        finally:
            call.cancel()
    return "CLOSED"


def _replace(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@pytest.fixture
def registry() -> PolicyRegistry:
    return registry_from("addHeader")


@pytest.fixture
async def secured(
    registry: PolicyRegistry, tmp_path: Path
) -> AsyncIterator[tuple[ControlPlane, TestPki]]:
    pki = TestPki(tmp_path / "pki")
    server = pki.server("controlplane")
    client_ca = tmp_path / "client-ca.pem"
    _replace(client_ca, pki.ca_file.read_bytes())
    plane = ControlPlane(
        registry, xds_cert=server.cert, xds_key=server.key, xds_client_ca=client_ca
    )
    await plane.start()
    try:
        yield plane, pki
    finally:
        assert await plane.stop() == 0


async def test_node_id_must_be_named_by_the_client_certificate(secured):
    plane, pki = secured
    await plane.table.put_route("r", _spec("1"), "test")
    edge1 = pki.client("edge-1", node_id="edge-1")
    assert await _ads_status(plane.xds_port, pki.ca_file, edge1, "edge-1") == "RESPONSE"
    spoofed = await _ads_status(plane.xds_port, pki.ca_file, edge1, "edge-2")
    assert spoofed.startswith("PERMISSION_DENIED: node id 'edge-2' is not named by the client")
    assert "'edge-1'" in spoofed
    no_node = await _ads_status(plane.xds_port, pki.ca_file, edge1, "")
    assert no_node.startswith("PERMISSION_DENIED: the first request must carry the node")
    plain = pki.client("plain", dns=["edge-1"])  # a DNS SAN names no node
    assert (await _ads_status(plane.xds_port, pki.ca_file, plain, "edge-1")).startswith(
        "PERMISSION_DENIED"
    )
    no_cert = await _ads_status(plane.xds_port, pki.ca_file, None, "edge-1")
    assert no_cert.startswith("UNAVAILABLE")


async def test_rotation_keeps_streams_and_reaches_the_next_handshake(
    registry: PolicyRegistry, tmp_path: Path
):
    """Server side: a rotated client CA admits new engines without a restart. Client side:
    a rotated client certificate is presented at the next connect, while the running
    stream keeps its connection and keeps getting pushes."""
    pki = TestPki(tmp_path / "a")
    successor = TestPki(tmp_path / "b")  # the CA that replaces A
    server = pki.server("controlplane")
    client_ca = tmp_path / "client-ca.pem"
    _replace(client_ca, pki.ca_file.read_bytes())
    node = pki.client("node", node_id="edge-1")
    files = ClientTlsFiles(
        ca=str(pki.ca_file), cert=str(node.cert), key=str(node.key), server_name="localhost"
    )
    plane = ControlPlane(
        registry, xds_cert=server.cert, xds_key=server.key, xds_client_ca=client_ca
    )
    await plane.start()
    port = plane.xds_port
    engine = Engine(registry, port, "edge-1", files)
    second: Engine | None = None
    try:
        change = await plane.table.put_route("r", _spec("1"), "test")
        assert change.errors == []
        await engine.acked(plane.table.current.version)
        assert engine.source.status.connects == 1

        # Rotate both sides to CA B: the control plane trusts only B from now on, and the
        # engine's certificate is B's (same path, the kubelet's ..data swap).
        _replace(client_ca, successor.ca_file.read_bytes())
        successor.client("node", node_id="edge-1", into=node.directory)
        await plane.table.put_route("r", _spec("2"), "test")
        await engine.acked(plane.table.current.version)
        assert engine.source.status.connects == 1  # the same stream: nothing was dropped

        # A new engine with B's certificate is admitted by the same process (rotated CA);
        # A's certificates are not any more.
        newcomer = successor.client("newcomer", node_id="edge-2")
        second = Engine(
            registry,
            port,
            "edge-2",
            ClientTlsFiles(str(pki.ca_file), str(newcomer.cert), str(newcomer.key), "localhost"),
        )
        await second.acked(plane.table.current.version)
        old = pki.client("old", node_id="edge-3")
        assert (await _ads_status(port, pki.ca_file, old, "edge-3")).startswith("UNAVAILABLE")

        # The control plane restarts (same port, same files): the engine reconnects with
        # the certificate on disk now (B's); A's would be refused and it would never ACK.
        assert await plane.stop() == 0
        plane = ControlPlane(
            registry, xds_cert=server.cert, xds_key=server.key, xds_client_ca=client_ca
        )
        plane.args.xds_listen = f"127.0.0.1:{port}"
        await plane.start()
        await plane.table.put_route("r", _spec("3"), "test")
        await engine.acked(plane.table.current.version)
        assert engine.source.status.connects >= 2
    finally:
        await engine.close()
        if second is not None:
            await second.close()
        await plane.stop()


def test_ads_beyond_loopback_needs_mtls_or_insecure(capsys: pytest.CaptureFixture[str]) -> None:
    # --admin-no-auth: the admin API's own checks (loopback here) are not what is tested.
    base = ["--definitions", "d.json", "--admin-no-auth"]
    with pytest.raises(SystemExit) as exited:
        parse_args([*base, "--xds-listen", "0.0.0.0:18000"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--xds-listen 0.0.0.0:18000 is not a loopback address" in error
    assert "--xds-client-ca" in error
    assert "--xds-insecure" in error
    with pytest.raises(SystemExit):  # TLS without client certificates is not enough
        parse_args([*base, "--xds-listen", "[::]:1", "--xds-cert", "c", "--xds-key", "k"])
    assert parse_args([*base, "--xds-listen", "0.0.0.0:18000", "--xds-insecure"]).xds_insecure
    mtls = ["--xds-cert", "c", "--xds-key", "k", "--xds-client-ca", "ca"]
    assert parse_args([*base, "--xds-listen", "0.0.0.0:18000", *mtls]).xds_client_ca == "ca"
    assert parse_args(base).xds_listen == "127.0.0.1:18000"  # the default stays loopback
    for bad in (["--xds-cert", "c"], ["--xds-client-ca", "ca"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])


async def test_unusable_tls_files_are_a_startup_error_naming_file_and_flag(
    registry: PolicyRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    pki = TestPki(tmp_path / "pki")
    server = pki.server("controlplane")
    missing = tmp_path / "missing-ca.pem"
    plane = ControlPlane(registry, xds_cert=server.cert, xds_key=server.key, xds_client_ca=missing)
    with pytest.raises(RuntimeError, match="exited with 1"):
        await plane.start()
    assert f"--xds-client-ca {missing}: cannot read the client CA bundle" in caplog.text
    other = pki.server("other")
    plane = ControlPlane(registry, xds_cert=server.cert, xds_key=other.key)
    with pytest.raises(RuntimeError, match="exited with 1"):
        await plane.start()
    assert f"--xds-key {other.key}: the private key does not match the certificate" in caplog.text
