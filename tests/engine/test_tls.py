"""engine.tls: checked loading, rotation, node identities, loopback; engine.tls_testing."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from engine.errors import TlsError
from engine.tls import (
    ClientTlsFiles,
    ServerTls,
    ServerTlsFiles,
    is_loopback,
    load_client_material,
    load_server_material,
    node_identity,
    node_ids_of,
)
from engine.tls_testing import TEST_TRUST_DOMAIN, TestPki
from engine.tls_testing import main as tls_testing_main


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


def _serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:9002", True),
        ("127.3.4.5:1", True),
        ("localhost:9002", True),
        ("[::1]:9002", True),
        ("0.0.0.0:9002", False),
        ("[::]:9002", False),
        ("10.0.0.7:9002", False),
        ("engine.svc:9002", False),
        (":9002", False),
        ("127.0.0.1", True),
    ],
    ids=str,
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize(
    ("uris", "ids"),
    [
        (["spiffe://td/node/edge-1"], ["edge-1"]),
        (["spiffe://td/node/a", "spiffe://other/node/b"], ["a", "b"]),
        (["spiffe://td/node/"], []),
        (["spiffe://td/node/a/b"], []),  # the id is the whole rest: no '/'
        (["spiffe:///node/a"], []),  # no trust domain
        (["spiffe://td/ns/x/sa/node"], []),  # Istio-style identities name no node
        (["https://td/node/a"], []),
        (["spiffe://td/nodes/a"], []),
    ],
    ids=["one", "two", "empty-id", "slash", "no-domain", "istio", "not-spiffe", "nodes"],
)
def test_node_ids_of(uris: list[str], ids: list[str]) -> None:
    assert node_ids_of(uris) == ids


def test_pki_writes_a_kubernetes_style_secret_and_rotates_it(pki: TestPki) -> None:
    issued = pki.server("engine")
    assert {p.name for p in issued.directory.iterdir()} >= {
        "tls.crt",
        "tls.key",
        "ca.crt",
        "..data",
    }
    assert issued.cert.is_symlink()
    assert os.readlink(issued.cert) == "..data/tls.crt"
    assert issued.ca.read_bytes() == pki.ca_file.read_bytes()
    assert (issued.key.stat().st_mode & 0o777) == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    before = _serial(issued.cert)
    again = pki.server("engine")  # re-issue: the ..data swap, the old version removed
    assert again.cert == issued.cert
    assert _serial(issued.cert) != before
    assert len([p for p in issued.directory.iterdir() if p.name.startswith("..2")]) == 1
    client = pki.client("node", node_id="edge-1", dns=["edge-1.example"])
    cert = x509.load_pem_x509_certificate(client.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [node_identity(TEST_TRUST_DOMAIN, "edge-1")]
    assert node_ids_of(uris) == ["edge-1"]


def test_loading_checks_the_files(pki: TestPki) -> None:
    issued = pki.server("engine")
    cert, key, ca = load_server_material(
        ServerTlsFiles(str(issued.cert), str(issued.key), str(issued.ca))
    )
    assert cert == issued.cert.read_bytes()
    assert key == issued.key.read_bytes()
    assert ca == pki.ca_file.read_bytes()
    client = pki.client("envoy")
    assert load_client_material(ClientTlsFiles(str(pki.ca_file), str(client.cert), str(client.key)))


def _errors(files: ServerTlsFiles) -> str:
    with pytest.raises(TlsError) as caught:
        load_server_material(files)
    return str(caught.value)


def test_every_bad_file_is_an_error_naming_file_and_flag(pki: TestPki, tmp_path: Path) -> None:
    issued = pki.server("engine")
    other = pki.server("other")
    key_text = issued.key.read_text()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted.key"
    private = serialization.load_pem_private_key(issued.key.read_bytes(), None)
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cert, key = str(issued.cert), str(issued.key)
    cases = {
        "missing cert": (ServerTlsFiles(str(tmp_path / "nope.crt"), key), "--tls-cert", "nope.crt"),
        "missing key": (ServerTlsFiles(cert, str(tmp_path / "nope.key")), "--tls-key", "nope.key"),
        "missing ca": (
            ServerTlsFiles(cert, key, str(tmp_path / "ca.nope")),
            "--tls-client-ca",
            "ca.nope",
        ),
        "not pem": (ServerTlsFiles(str(garbage), key), "--tls-cert", "garbage.pem"),
        "broken cert": (ServerTlsFiles(str(broken), key), "--tls-cert", "broken.pem"),
        "broken ca": (ServerTlsFiles(cert, key, str(broken)), "--tls-client-ca", "broken.pem"),
        "mismatch": (ServerTlsFiles(cert, str(other.key)), "--tls-key", "does not match"),
        "encrypted": (ServerTlsFiles(cert, str(encrypted)), "--tls-key", "encrypted"),
        "key as cert": (ServerTlsFiles(key, key), "--tls-cert", str(issued.key)),
    }
    for name, (files, flag, text) in cases.items():
        message = _errors(files)
        assert flag in message, (name, message)
        assert text in message, (name, message)
        assert "PRIVATE KEY" not in message, name
        assert key_text[40:80] not in message, name


def _client_handshake(port: int, ca: Path, client: tuple[Path, Path] | None) -> int:
    """Handshake with 127.0.0.1:port; the server certificate's serial number."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def test_ssl_context_follows_rotation_and_keeps_a_bad_rotation_out(
    pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    issued = pki.server("engine")
    tls = ServerTls(ServerTlsFiles(str(issued.cert), str(issued.key)))
    first = tls.ssl_context()
    assert tls.ssl_context() is first  # unchanged files: the same context
    pki.server("engine")
    second = tls.ssl_context()
    assert second is not first
    assert tls.reloads == 1
    # A half-done rotation (a key that does not match): logged once, the old set serves.
    good_key = issued.key.read_bytes()
    shutil.copyfile(pki.server("other").key, issued.directory / "..data" / "tls.key")
    with caplog.at_level(logging.WARNING, logger="engine.tls"):
        assert tls.ssl_context() is second
        assert tls.ssl_context() is second
    warnings = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(warnings) == 1
    assert "does not match" in warnings[0]
    assert "PRIVATE KEY" not in caplog.text
    (issued.directory / "..data" / "tls.key").write_bytes(good_key)  # the rotation completes
    assert tls.ssl_context() is not second
    assert tls.reloads == 2


def test_rotation_reaches_the_next_handshake_of_a_real_listener(
    pki: TestPki, tmp_path: Path
) -> None:
    """The metrics listener's wrapping: each connection uses the files as they are then."""
    from engine import metrics

    issued = pki.server("engine")
    tls = ServerTls(ServerTlsFiles(str(issued.cert), str(issued.key), str(pki.ca_file)))
    stop = metrics.serve("127.0.0.1:0", tls=tls)
    port = stop.port  # type: ignore[attr-defined]
    client = pki.client("prometheus")
    try:
        assert _client_handshake(port, pki.ca_file, (client.cert, client.key)) == _serial(
            issued.cert
        )
        pki.server("engine")
        assert _client_handshake(port, pki.ca_file, (client.cert, client.key)) == _serial(
            issued.cert
        )
    finally:
        stop()


def test_tls_testing_cli_writes_a_demo_pki(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tls_testing_main([str(tmp_path / "demo"), "--node-id", "e1"]) == 0
    assert "node-e1:" in capsys.readouterr().out
    for name in ("engine", "controlplane", "envoy", "node-e1"):
        assert (tmp_path / "demo" / name / "tls.key").is_file()
