"""A throw-away PKI for tests and the demo: a CA, server and client certificates, on disk.

Not shipped in an engine (its own Bazel target, ``//engine:tls_testing``; it needs
``cryptography``). Every certificate is written the way Kubernetes mounts a TLS secret
(what cert-manager produces), so the same paths work for the image's default command::

    <dir>/<name>/tls.crt   the certificate (PEM)
    <dir>/<name>/tls.key   its private key (PEM, PKCS#8, unencrypted, mode 0600)
    <dir>/<name>/ca.crt    the CA that issued it (PEM) - also the CA a peer verifies with

Each of the three is a symlink into ``<dir>/<name>/..data/`` and ``..data`` is itself a
symlink to a timestamped folder; :meth:`TestPki.issue` on an existing ``<name>`` writes a
new folder and swaps ``..data`` atomically, exactly as the kubelet updates a mounted
secret: the rotation that :mod:`engine.tls` must pick up without a restart.

Example::

    pki = TestPki(tmp_path / "pki")
    server = pki.server("engine")                      # SAN DNS localhost, IP 127.0.0.1
    client = pki.client("envoy", dns=["envoy"])        # SAN DNS envoy, EKU clientAuth
    node = pki.client("edge-1", node_id="edge-1")      # SAN URI spiffe://<td>/node/edge-1
    other = TestPki(tmp_path / "other")                # a CA nobody trusts

``python -m engine.tls_testing DIR [--node-id ID ...]`` writes ``ca``, ``engine``,
``controlplane``, ``envoy`` and one ``node-<ID>`` client per node id (default ``edge-1``)
and prints the paths (the demo's secured mode; never for production).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.tls import node_identity

__all__ = ["TEST_TRUST_DOMAIN", "Issued", "TestPki", "main"]

TEST_TRUST_DOMAIN: Final = "policy-engine.test"
"""The SPIFFE trust domain of the node identities this PKI issues."""


@dataclass(frozen=True)
class Issued:
    """The files of one issued certificate (see the module docstring for the layout)."""

    directory: Path
    cert: Path
    key: Path
    ca: Path
    """The issuing CA's certificate (what the peer must trust)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestPki:
    """A CA under ``directory`` (``ca/ca.crt``, ``ca/ca.key``) that issues certificates.

    Certificates are ECDSA P-256, valid from 5 minutes ago for ``days`` days (default 1);
    the CA is new for every instance (trusted by nobody but who is given its file).
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, directory: Path, *, name: str = "policy-engine test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)
        ca_dir = directory / "ca"
        ca_dir.mkdir(exist_ok=True)
        self.ca_file: Path = ca_dir / "ca.crt"
        """The CA certificate (PEM): give it to whoever must trust this PKI."""
        self.ca_file.write_bytes(self.ca_pem)
        key_file = ca_dir / "ca.key"
        key_file.write_bytes(_pem_key(self._key))
        key_file.chmod(0o600)

    def server(
        self,
        name: str,
        *,
        dns: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        days: float = 1.0,
        into: Path | None = None,
    ) -> Issued:
        """Issue a server certificate (EKU serverAuth) for ``dns`` and ``ips`` into
        ``<directory>/<name>/`` (replacing, atomically, one issued there before)."""
        return self.issue(name, dns=dns, ips=ips, server=True, days=days, into=into)

    def client(
        self,
        name: str,
        *,
        node_id: str | None = None,
        dns: Sequence[str] = (),
        uris: Sequence[str] = (),
        trust_domain: str = TEST_TRUST_DOMAIN,
        days: float = 1.0,
        into: Path | None = None,
    ) -> Issued:
        """Issue a client certificate (EKU clientAuth) into ``<directory>/<name>/``.

        ``node_id``: add the URI SAN the control plane checks the xDS node id against
        (:func:`engine.tls.node_identity`: ``spiffe://<trust_domain>/node/<node_id>``).
        ``dns``/``uris``: further SANs."""
        all_uris = list(uris)
        if node_id is not None:
            all_uris.append(node_identity(trust_domain, node_id))
        return self.issue(name, dns=dns, uris=all_uris, server=False, days=days, into=into)

    def issue(
        self,
        name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        server: bool,
        days: float = 1.0,
        into: Path | None = None,
    ) -> Issued:
        """Issue one certificate with these SANs (see :meth:`server`, :meth:`client`).

        A negative ``days`` makes a certificate that has already expired. ``into``: write
        into that directory instead of ``<directory>/<name>`` (e.g. rotate a secret
        another CA issued to this CA's certificate)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start = now - datetime.timedelta(minutes=5)
        end = now + datetime.timedelta(days=days)
        if end <= start:
            start = end - datetime.timedelta(days=1)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return _write_secret(
            into if into is not None else self.directory / name,
            {
                "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
                "tls.key": _pem_key(key),
                "ca.crt": self.ca_pem,
            },
        )


def _write_secret(directory: Path, files: dict[str, bytes]) -> Issued:
    """Write ``files`` as the kubelet writes a secret volume: a new timestamped folder,
    an atomic swap of the ``..data`` symlink, and per-file symlinks through it."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    version.mkdir()
    for filename, content in files.items():
        path = version / filename
        path.write_bytes(content)
        path.chmod(0o600 if filename.endswith(".key") else 0o644)
    temporary = directory / "..data_tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(version.name)
    previous = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.replace(temporary, directory / "..data")
    for filename in files:
        link = directory / filename
        if not link.is_symlink():
            link.symlink_to(f"..data/{filename}")
    if previous is not None:  # the kubelet removes the old version after the swap
        for old in (directory / previous).iterdir():
            old.unlink()
        (directory / previous).rmdir()
    return Issued(directory, directory / "tls.crt", directory / "tls.key", directory / "ca.crt")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.tls_testing DIR``: write a demo PKI; print where each part is."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.tls_testing",
        description="Write a throw-away test PKI (never for production).",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--node-id", action="append", default=None, help="engine node ids")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    pki = TestPki(args.directory)
    print(f"ca: {pki.ca_file}")
    issued = {
        "engine": pki.server("engine"),
        "controlplane": pki.server("controlplane"),
        "envoy": pki.client("envoy", dns=["envoy"]),
    }
    for node in args.node_id or ["edge-1"]:
        issued[f"node-{node}"] = pki.client(f"node-{node}", node_id=node)
    for name, files in issued.items():
        print(f"{name}: {files.directory}/{{tls.crt,tls.key,ca.crt}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
