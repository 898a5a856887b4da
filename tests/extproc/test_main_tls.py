"""engine.main's TLS flags: non-loopback links need mTLS (or --insecure), and unusable
TLS files are a startup error naming the file and the flag."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from engine.main import main, parse_args
from engine.tls_testing import TestPki
from tests.support import registry_from

CONFIG = "routes: {public: {policies: []}}\n"


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def mtls(tmp_path: Path) -> list[str]:
    pki = TestPki(tmp_path / "pki")
    server = pki.server("engine")
    return [
        "--tls-cert",
        str(server.cert),
        "--tls-key",
        str(server.key),
        "--tls-client-ca",
        str(pki.ca_file),
    ]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--listen", "0.0.0.0:9002"], "--listen 0.0.0.0:9002"),
        (["--listen", "[::]:9002"], "--listen [::]:9002"),
        (["--listen", "10.1.2.3:9002"], "--listen 10.1.2.3:9002"),
        (["--metrics-listen", "0.0.0.0:9090"], "--metrics-listen 0.0.0.0:9090"),
        (["--listen-http", "0.0.0.0:9003"], "--listen-http 0.0.0.0:9003"),
    ],
    ids=["v4-any", "v6-any", "address", "metrics", "http-transport"],
)
def test_listeners_beyond_loopback_need_mtls_or_insecure(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = _refused(["--config", "c.yaml", *argv], capsys)
    assert f"{flag} is not a loopback address" in error
    assert "--tls-client-ca" in error
    assert "--insecure" in error
    # TLS without client certificates is not enough either.
    tls_only = ["--tls-cert", "c.pem", "--tls-key", "k.pem"]
    assert "is not a loopback address" in _refused(["--config", "c.yaml", *argv, *tls_only], capsys)
    assert parse_args(["--config", "c.yaml", *argv, "--insecure"]).insecure


def test_health_port_is_loopback_only(mtls: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    error = _refused(["--config", "c", *mtls, "--health-listen", "0.0.0.0:9003"], capsys)
    assert "--health-listen 0.0.0.0:9003 is not a loopback address: it is always plaintext" in error
    assert parse_args(["--config", "c", "--health-listen", "127.0.0.1:9003"]).health_listen


def test_mtls_or_loopback_is_accepted(mtls: list[str]) -> None:
    assert parse_args(["--config", "c.yaml"]).listen == "127.0.0.1:9002"  # default: loopback
    args = parse_args(["--config", "c.yaml", "--listen", "0.0.0.0:9002", *mtls])
    assert args.tls_client_ca is not None
    args = parse_args(["--config", "c", "--listen", "[::]:1", "--metrics-listen", ":9", *mtls])
    assert args.metrics_listen == ":9"


def test_xds_beyond_loopback_needs_tls_or_insecure(capsys: pytest.CaptureFixture[str]) -> None:
    error = _refused(["--xds", "controlplane.svc:18000"], capsys)
    assert "--xds controlplane.svc:18000 is not a loopback address: give --xds-ca" in error
    assert parse_args(["--xds", "controlplane.svc:18000", "--insecure"]).insecure
    assert parse_args(["--xds", "controlplane.svc:18000", "--xds-ca", "ca"]).xds_ca == "ca"
    assert parse_args(["--xds", "127.0.0.1:18000"]).xds_ca is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "c"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca"], "--tls-client-ca needs --tls-cert"),
        (["--xds-cert", "c", "--xds-key", "k", "--node-id", "n"], "--xds-cert needs --xds-ca"),
        (["--xds-ca", "ca", "--xds-cert", "c"], "--xds-cert and --xds-key go together"),
        (["--xds-ca", "ca", "--xds-cert", "c", "--xds-key", "k"], "--xds-cert needs --node-id"),
        (["--xds-server-name", "cp"], "--xds-server-name needs --xds-ca"),
    ],
    ids=["cert-alone", "ca-alone", "xds-cert-no-ca", "xds-key", "node-id", "server-name"],
)
def test_flag_combinations(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in _refused(["--xds", "127.0.0.1:1", *argv], capsys)


def test_unusable_tls_files_are_startup_errors_naming_file_and_flag(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = TestPki(tmp_path / "pki")
    server = pki.server("engine")
    other = pki.server("other")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    base = ["--config", str(config), "--workers", "1", "--listen", "127.0.0.1:0"]
    missing = tmp_path / "absent.crt"
    cases = [
        (["--tls-cert", str(missing), "--tls-key", str(server.key)], f"--tls-cert {missing}"),
        (
            ["--tls-cert", str(server.cert), "--tls-key", str(other.key)],
            f"--tls-key {other.key}: the private key does not match the certificate "
            f"--tls-cert {server.cert}",
        ),
        (
            [
                *("--tls-cert", str(server.cert), "--tls-key", str(server.key)),
                *("--tls-client-ca", str(missing)),
            ],
            f"--tls-client-ca {missing}: cannot read",
        ),
        (
            ["--xds", "127.0.0.1:1", "--xds-ca", str(missing)],
            f"--xds-ca {missing}: cannot read the CA bundle",
        ),
        (
            [
                *("--xds", "127.0.0.1:1", "--xds-ca", str(pki.ca_file), "--node-id", "n"),
                *("--xds-cert", str(server.cert), "--xds-key", str(other.key)),
            ],
            f"--xds-key {other.key}: the private key does not match",
        ),
    ]
    secret = other.key.read_text().splitlines()[1]
    for argv, message in cases:
        caplog.clear()
        registry = registry_from("addHeader")
        # (the records land in pytest's log capture)
        code = main([*base, *argv], registry=registry, stdout=io.StringIO(), stderr=io.StringIO())
        text = caplog.text
        assert code == 1, text
        assert message in text, text
        assert secret not in text
        assert "PRIVATE KEY" not in text
