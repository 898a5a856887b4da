"""TLS for the gRPC links and the metrics listener: PEM files, rotation, node identities.

Used by the engine (ext_proc listener, metrics listener, xDS client) and by the control
plane (ADS listener). Three contracts:

**Files are checked at startup.** :func:`load_server_material` / :func:`load_client_material`
read the PEM files and check them with OpenSSL (the certificate parses, the private key
matches it, the CA bundle parses). Any problem is a :class:`~engine.errors.TlsError` whose
message names the file and the flag that gave it; the key's content never appears in a
message or a log line. Encrypted private keys are refused (nobody could type the password).

**Rotation without a restart.** Listeners get
:meth:`ServerTls.grpc_credentials` (gRPC's ``dynamic_ssl_server_credentials``) or
:meth:`ServerTls.ssl_context` (the metrics listener): before each new TLS handshake the
three files are ``stat``-ed (device, inode, size, mtime: following symlinks, so the
kubelet's ``..data`` swap of a cert-manager secret counts) and, when they changed, read
and checked again. A valid new set serves every later handshake; established connections
and streams keep the keys they negotiated (they are never dropped). An invalid set (a
half-written file, a key that does not match the certificate yet) is logged once, and the
previous set keeps serving until the files change again. Clients
(:func:`channel_credentials`) read the files each time a channel is made: the xDS client
makes a fresh channel per connection attempt, so a rotated client certificate is used from
the next connect on, while the running stream keeps its connection.

**Node identity (ADS with mTLS).** An engine's xDS node id must be named by its client
certificate: a URI SAN ``spiffe://<trust-domain>/node/<node-id>`` (:func:`node_identity`),
any trust domain (the control plane's ``--xds-client-ca`` decides who may issue them), the
node id compared byte for byte with the rest of the path (so it contains no ``/``).
:func:`node_ids_of` extracts the ids a certificate names. Why a URI SAN and not a DNS SAN
equal to the node id: a node id is an identity, not a host name; a DNS SAN would also make
the client certificate a server certificate for that name wherever its CA is trusted for
servers, and SPIFFE URIs are what workload-identity issuers (cert-manager ``uris``,
csi-driver-spiffe, SPIRE) write.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import grpc

from engine.errors import TlsError

__all__ = [
    "ClientTlsFiles",
    "ServerTls",
    "ServerTlsFiles",
    "channel_credentials",
    "channel_options",
    "is_loopback",
    "load_client_material",
    "load_server_material",
    "node_identity",
    "node_ids_of",
]

log: Final = logging.getLogger("engine.tls")

_NODE_PATH: Final = "node/"


def node_identity(trust_domain: str, node_id: str) -> str:
    """The URI SAN that names xDS node ``node_id``: ``spiffe://<trust_domain>/node/<id>``."""
    return f"spiffe://{trust_domain}/{_NODE_PATH}{node_id}"


def node_ids_of(uris: Iterable[str]) -> list[str]:
    """The node ids named by ``uris`` (a certificate's URI SANs), in order: each URI of the
    form ``spiffe://<non-empty trust domain>/node/<non-empty id without '/'>``."""
    found: list[str] = []
    for uri in uris:
        if not uri.startswith("spiffe://"):
            continue
        trust_domain, slash, path = uri[len("spiffe://") :].partition("/")
        if not trust_domain or not slash or not path.startswith(_NODE_PATH):
            continue
        node_id = path[len(_NODE_PATH) :]
        if node_id and "/" not in node_id:
            found.append(node_id)
    return found


def is_loopback(address: str) -> bool:
    """Whether ``address`` (``host:port``, ``[v6]:port`` or a bare host) is loopback only:
    ``localhost`` or an IP address in 127.0.0.0/8 or ``::1``. Wildcards (``0.0.0.0``,
    ``[::]``), other addresses and other host names are not."""
    host = address
    if address.startswith("["):
        host = address[1:].partition("]")[0]
    elif address.count(":") == 1:
        host = address.rpartition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class ServerTlsFiles:
    """A listener's files: the certificate (chain) and key it presents and, for mTLS, the
    CA bundle client certificates must chain to (``None``: no client certificate asked).
    The ``*_flag`` names appear in error messages."""

    cert: str
    key: str
    client_ca: str | None = None
    cert_flag: str = "--tls-cert"
    key_flag: str = "--tls-key"
    client_ca_flag: str = "--tls-client-ca"


@dataclass(frozen=True)
class ClientTlsFiles:
    """A client's files: the CA bundle that verifies the server, optionally the client
    certificate and key it presents (mTLS), and a server name to verify instead of the
    target's host (``grpc.ssl_target_name_override``)."""

    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    ca_flag: str = "--xds-ca"
    cert_flag: str = "--xds-cert"
    key_flag: str = "--xds-key"


@dataclass(frozen=True)
class _Material:
    cert: bytes | None
    key: bytes | None
    ca: bytes | None


def _read(path: str, flag: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read the {what}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{flag} {path}: the {what} is not in PEM format")
    return data


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from, never on disk (the key stays in memory)."""
    fd = os.memfd_create("tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _no_password() -> bytes:
    raise TlsError("encrypted private key")


def _check_ca(data: bytes, path: str, flag: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsError(f"{flag} {path}: not a valid PEM certificate bundle ({exc})") from None


def _check_pair(
    cert: bytes, key: bytes, files: tuple[str, str, str, str], context: ssl.SSLContext | None
) -> ssl.SSLContext:
    """Check that ``cert`` parses and ``key`` matches it (into ``context``, or a new one)."""
    cert_path, cert_flag, key_path, key_flag = files
    _check_ca(cert, cert_path, cert_flag)  # the certificate itself parses
    context = context if context is not None else ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _memory_file(cert) as cert_file, _memory_file(key) as key_file:
        try:
            context.load_cert_chain(cert_file, key_file, password=_no_password)
        except TlsError:
            raise TlsError(
                f"{key_flag} {key_path}: the private key is encrypted (give an unencrypted key)"
            ) from None
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
                raise TlsError(
                    f"{key_flag} {key_path}: the private key does not match the certificate "
                    f"{cert_flag} {cert_path}"
                ) from None
            raise TlsError(
                f"{key_flag} {key_path}: not a valid PEM private key for {cert_flag} {cert_path} "
                f"({exc.reason or 'unreadable'})"
            ) from None
    return context


def load_server_material(files: ServerTlsFiles) -> tuple[bytes, bytes, bytes | None]:
    """``(cert, key, client_ca)`` PEM bytes, checked; raises :class:`TlsError`."""
    cert = _read(files.cert, files.cert_flag, "certificate")
    key = _read(files.key, files.key_flag, "private key")
    _check_pair(cert, key, (files.cert, files.cert_flag, files.key, files.key_flag), None)
    ca = None
    if files.client_ca is not None:
        ca = _read(files.client_ca, files.client_ca_flag, "client CA bundle")
        _check_ca(ca, files.client_ca, files.client_ca_flag)
    return cert, key, ca


def load_client_material(files: ClientTlsFiles) -> tuple[bytes, bytes | None, bytes | None]:
    """``(ca, cert, key)`` PEM bytes, checked; raises :class:`TlsError`."""
    ca = _read(files.ca, files.ca_flag, "CA bundle")
    _check_ca(ca, files.ca, files.ca_flag)
    if files.cert is None or files.key is None:
        return ca, None, None
    cert = _read(files.cert, files.cert_flag, "certificate")
    key = _read(files.key, files.key_flag, "private key")
    _check_pair(cert, key, (files.cert, files.cert_flag, files.key, files.key_flag), None)
    return ca, cert, key


def channel_credentials(files: ClientTlsFiles) -> grpc.ChannelCredentials:
    """Channel credentials from the files as they are now (read at every call: call it per
    connection attempt and a rotated certificate is used from the next connect)."""
    ca, cert, key = load_client_material(files)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def channel_options(files: ClientTlsFiles) -> list[tuple[str, str]]:
    """Channel options for ``files`` (the server name override, when set)."""
    if files.server_name:
        return [("grpc.ssl_target_name_override", files.server_name)]
    return []


# ------------------------------------------------------------------------ servers


_Signature = tuple[tuple[int, int, int, int] | None, ...]


class ServerTls:
    """A listener's TLS files, re-read when they change (see the module docstring).

    Constructing it loads and checks the files (:class:`TlsError` on any problem: a
    startup error). Thread-safe: gRPC calls the fetcher from its own threads, the metrics
    server from its accept thread. ``reloads`` counts accepted rotations.
    """

    def __init__(self, files: ServerTlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._material = load_server_material(files)
        self._rejected: _Signature | None = None
        self._context: ssl.SSLContext | None = None
        self.reloads = 0

    @property
    def mutual(self) -> bool:
        """Whether client certificates are required."""
        return self.files.client_ca is not None

    def _paths(self) -> list[str]:
        paths = [self.files.cert, self.files.key]
        return paths if self.files.client_ca is None else [*paths, self.files.client_ca]

    def _stat(self) -> _Signature:
        signature: list[tuple[int, int, int, int] | None] = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                signature.append(None)
            else:
                signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(signature)

    def _refresh(self) -> bool:
        """Re-read the files if they changed; True when a new valid set was taken."""
        signature = self._stat()
        if signature in (self._signature, self._rejected):
            return False
        try:
            material = load_server_material(self.files)
        except TlsError as exc:
            self._rejected = signature
            log.warning("TLS files changed but cannot be used (%s); keeping the previous ones", exc)
            return False
        # The files may have changed again while we read them: the next handshake checks.
        self._signature = signature
        self._rejected = None
        self._material = material
        self._context = None
        self.reloads += 1
        log.info("TLS: reloaded %s and %s", self.files.cert, self.files.key)
        return True

    def _grpc_config(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self._material
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC calls this before each handshake; None keeps the current configuration.
        try:
            with self._lock:
                return self._grpc_config() if self._refresh() else None
        except Exception:  # never fail a handshake over a reload problem
            log.exception("TLS: checking %s for changes failed", self.files.cert)
            return None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials that pick up rotated files at the next handshake."""
        with self._lock:
            initial = self._grpc_config()
        # The stubs say the fetcher returns a configuration; gRPC documents None as
        # "no change", which is what _fetch returns between rotations.
        return grpc.dynamic_ssl_server_credentials(
            initial,
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=self.mutual,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The ``ssl`` server context for the current files (a new one after a rotation):
        TLS 1.2 or later, client certificates required when a client CA is set."""
        with self._lock:
            self._refresh()
            if self._context is None:
                cert, key, ca = self._material
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                names = (self.files.cert, self.files.cert_flag, self.files.key, self.files.key_flag)
                _check_pair(cert, key, names, context)
                if ca is not None:
                    context.verify_mode = ssl.CERT_REQUIRED
                    context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
                self._context = context
            return self._context
