"""Test doubles for the jwtValidation policies (every version's tests use these).

* :func:`make_pki` creates a throw-away CA and a server certificate for
  ``127.0.0.1`` (PEM files in a directory), so tests exercise real TLS
  verification with the policy's ``caFile`` parameter.
* :class:`JwksServer` serves a JWKS document over HTTPS from a thread on a free
  ``127.0.0.1`` port. Tests change ``keys`` to rotate keys, set ``status`` to make
  the IdP fail, ``delay`` or ``trickle`` to make it slow, :meth:`~JwksServer.hold`
  to keep a fetch in flight until :meth:`~JwksServer.release`, ``redirect`` to
  answer 302, or :meth:`~JwksServer.stop`
  it for a real outage; ``hits`` counts fetches and ``connections`` TLS connections
  (HTTP/1.1 keep-alive, so a client that reuses its connection opens one). Use it as
  a context manager so it is always shut down.
* :class:`SigningKey` holds a private key and signs tokens; its ``jwk`` is the
  public half as published in a JWKS.

Test-only code: nothing here is imported by a policy.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from ssl import PROTOCOL_TLS_SERVER, SSLContext
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.warnings import InsecureKeyLengthWarning

from engine.tls_testing import TestPki

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "REJECTED_TOKENS",
    "JwksServer",
    "KeySet",
    "Pki",
    "SigningKey",
    "claims",
    "forge",
    "make_pki",
    "now",
]

ISSUER = "https://idp.test/"
AUDIENCE = "orders-api"


def now() -> int:
    """Current Unix time in whole seconds (what ``exp``/``nbf``/``iat`` hold)."""
    return int(time.time())


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files made by :func:`make_pki`."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(directory: Path) -> Pki:
    """Write ``ca.pem``, ``server.pem`` and ``server-key.pem`` into ``directory``: a new
    CA and a server certificate it signed for IP ``127.0.0.1`` (and ``localhost``), valid
    for a day; neither is trusted by the system store.

    Made by :class:`engine.tls_testing.TestPki` (under ``directory/.pki``), copied to
    these names: one place makes test certificates.
    """
    made = TestPki(directory / ".pki")
    server = made.server("server")
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    pki.ca_file.write_bytes(made.ca_file.read_bytes())
    pki.cert_file.write_bytes(server.cert.read_bytes())
    pki.key_file.write_bytes(server.key.read_bytes())
    pki.key_file.chmod(0o600)
    return pki


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class SigningKey:
    """A private signing key with its ``kid`` and algorithm."""

    kid: str
    alg: str
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def rsa(cls, kid: str, alg: str = "RS256") -> SigningKey:
        return cls(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str, alg: str = "ES256") -> SigningKey:
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1()}[alg]
        return cls(kid, alg, ec.generate_private_key(curve))

    @property
    def jwk(self) -> dict[str, Any]:
        """The public key as a JWKS entry (``kid``, ``alg``, ``use: sig``)."""
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        """A compact JWS of ``claims``; ``header`` adds to or overrides ``kid`` (``None``
        drops a header field)."""
        with warnings.catch_warnings():
            # Weak test keys are signed on purpose; the policy must refuse them.
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            headers = {k: v for k, v in {"kid": self.kid, **header}.items() if v is not None}
            return jwt.encode(claims, self.private_key, algorithm=self.alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A token with arbitrary header and signature (what an attacker can send)."""
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature))
    )


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for :data:`ISSUER` / :data:`AUDIENCE`, five minutes to live;
    ``changes`` override claims, and a ``None`` value removes one."""
    t = now()
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "email": "alice@example.com",
        "iat": t,
        "nbf": t,
        "exp": t + 300,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@dataclass(frozen=True)
class KeySet:
    """The keys a JWT test needs. ``published`` lists what the JWKS serves at first;
    ``rotated`` is a valid key the IdP has not published yet."""

    rsa: SigningKey
    ec: SigningKey
    rotated: SigningKey
    weak: SigningKey

    @classmethod
    def generate(cls) -> KeySet:
        weak = SigningKey("weak-1", "RS256", rsa.generate_private_key(65537, 1024))
        return cls(SigningKey.rsa("rsa-1"), SigningKey.ec("ec-1"), SigningKey.rsa("rsa-2"), weak)

    @property
    def published(self) -> list[dict[str, Any]]:
        return [self.rsa.jwk, self.ec.jwk, self.weak.jwk]


def _tampered(keys: KeySet) -> str:
    header, _, signature = keys.rsa.sign(claims()).split(".")
    return f"{header}.{_b64(json.dumps(claims(sub='admin')).encode())}.{signature}"


def _hs256_with_public_key(keys: KeySet) -> str:
    header = {"alg": "HS256", "typ": "JWT", "kid": keys.rsa.kid}
    unsigned = forge(header, claims()).rsplit(".", 1)[0]
    mac = hmac.new(keys.rsa.public_pem, unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{_b64(mac)}"


REJECTED_TOKENS: list[tuple[str, Callable[[KeySet], str], str]] = [
    ("expired", lambda k: k.rsa.sign(claims(exp=now() - 120)), "token expired"),
    ("not-yet-valid", lambda k: k.rsa.sign(claims(nbf=now() + 120)), "token not yet valid"),
    ("wrong-issuer", lambda k: k.rsa.sign(claims(iss="https://evil.test/")), "issuer not"),
    ("no-issuer", lambda k: k.rsa.sign(claims(iss=None)), "token has no iss claim"),
    ("wrong-audience", lambda k: k.rsa.sign(claims(aud="other-api")), "audience not accepted"),
    ("no-audience", lambda k: k.rsa.sign(claims(aud=None)), "token has no aud claim"),
    ("no-expiry", lambda k: k.rsa.sign(claims(exp=None)), "token has no exp claim"),
    ("unknown-kid", lambda k: k.rotated.sign(claims()), "no usable key"),
    ("no-kid", lambda k: k.rsa.sign(claims(), kid=None), "token has no key id"),
    (
        "alg-none",
        lambda k: forge({"alg": "none", "typ": "JWT", "kid": k.rsa.kid}, claims()),
        "signature algorithm not allowed",
    ),
    ("hs256-with-rsa-public-key", _hs256_with_public_key, "signature algorithm not allowed"),
    ("tampered-payload", _tampered, "signature verification failed"),
    (
        "signed-by-another-key-same-kid",
        lambda k: SigningKey(k.rsa.kid, "RS256", k.rotated.private_key).sign(claims()),
        "signature verification failed",
    ),
    (
        "alg-not-in-allow-list",
        lambda k: SigningKey(k.rsa.kid, "RS384", k.rsa.private_key).sign(claims()),
        "signature algorithm not allowed",
    ),
    (
        "alg-differs-from-jwk-alg",
        lambda k: SigningKey(k.rsa.kid, "PS256", k.rsa.private_key).sign(claims()),
        "no usable key",
    ),
    (
        "rsa-alg-with-ec-key",
        lambda k: SigningKey(k.ec.kid, "RS256", k.rsa.private_key).sign(claims()),
        "no usable key",
    ),
    ("rsa-key-under-2048-bits", lambda k: k.weak.sign(claims()), "invalid token"),
    ("garbage", lambda k: "not-a-jwt", "malformed token"),
    ("two-segments", lambda k: "e30.e30", "malformed token"),
]
"""``(id, make_token, error_description substring)``: tokens every version must
refuse with 401 when configured with ``algorithms: [RS256, ES256, PS256]`` and
the :class:`KeySet` ``published`` keys."""


# --------------------------------------------------------------------------- server


@dataclass
class _State:
    keys: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    body: bytes | None = None
    delay: float = 0.0
    trickle: float = 0.0
    redirect: str | None = None
    unframed: bool = False
    gate: threading.Event = field(default_factory=threading.Event)
    hits: int = 0
    connections: int = 0
    open_sockets: set[socket.socket] = field(default_factory=set)
    lock: threading.Condition = field(default_factory=threading.Condition)


class JwksServer:
    """An HTTPS JWKS endpoint on ``127.0.0.1``; see the module docstring.

    ``url`` is ``https://127.0.0.1:<port>/jwks.json``. Setting ``body`` serves
    those bytes verbatim instead of the JWKS built from ``keys``.
    """

    def __init__(self, pki: Pki, keys: list[dict[str, Any]] | None = None) -> None:
        self._state = _State(keys=list(keys or []))
        self._state.gate.set()
        state = self._state

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: clients may reuse connections

            def setup(self) -> None:
                super().setup()
                # Headers and body are two writes: without this, Nagle + delayed ACK
                # add ~40 ms to every keep-alive response.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with state.lock:
                    state.connections += 1
                    state.open_sockets.add(self.connection)

            def finish(self) -> None:
                with state.lock:
                    state.open_sockets.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                with state.lock:
                    state.hits += 1
                    state.lock.notify_all()
                    status = state.status
                    body = state.body
                    delay = state.delay
                    trickle = state.trickle
                    redirect = state.redirect if self.path == "/jwks.json" else None
                    unframed = state.unframed
                    if body is None:
                        body = json.dumps({"keys": state.keys}).encode()
                state.gate.wait(timeout=30)  # held by hold() until release()
                if delay:
                    time.sleep(delay)
                if self.path not in ("/jwks.json", "/moved.json"):
                    status, body = 404, b"not found"
                self.send_response(302 if redirect else status)
                if redirect:
                    self.send_header("location", redirect)
                self.send_header("content-type", "application/json")
                if unframed:  # no length: the body ends when the connection closes
                    self.send_header("connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    if not trickle:
                        self.wfile.write(body)
                        return
                    for index in range(len(body)):  # one byte at a time: a socket
                        self.wfile.write(body[index : index + 1])  # timeout never fires
                        self.wfile.flush()
                        time.sleep(trickle)
                except OSError:
                    self.close_connection = True  # the client gave up

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        context = SSLContext(PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.cert_file, pki.key_file)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}/jwks.json"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self._stopped = False

    @property
    def hits(self) -> int:
        with self._state.lock:
            return self._state.hits

    def wait_for_hits(self, hits: int, timeout: float = 10.0) -> None:
        """Block until ``hits`` requests have arrived; ``TimeoutError`` after ``timeout``."""
        with self._state.lock:
            if not self._state.lock.wait_for(lambda: self._state.hits >= hits, timeout):
                raise TimeoutError(f"JWKS server saw {self._state.hits} of {hits} requests")

    @property
    def connections(self) -> int:
        with self._state.lock:
            return self._state.connections

    @property
    def keys(self) -> list[dict[str, Any]]:
        return self._state.keys

    @keys.setter
    def keys(self, keys: list[dict[str, Any]]) -> None:
        with self._state.lock:
            self._state.keys = list(keys)

    @property
    def status(self) -> int:
        return self._state.status

    @status.setter
    def status(self, status: int) -> None:
        with self._state.lock:
            self._state.status = status

    @property
    def body(self) -> bytes | None:
        return self._state.body

    @body.setter
    def body(self, body: bytes | None) -> None:
        with self._state.lock:
            self._state.body = body

    @property
    def delay(self) -> float:
        return self._state.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        """Answer each request only after ``seconds`` (a slow IdP)."""
        with self._state.lock:
            self._state.delay = seconds

    @property
    def trickle(self) -> float:
        return self._state.trickle

    @trickle.setter
    def trickle(self, seconds: float) -> None:
        """Send the body one byte every ``seconds`` (a server that holds a fetch open
        while each read still succeeds within any per-read timeout)."""
        with self._state.lock:
            self._state.trickle = seconds

    @property
    def redirect(self) -> str | None:
        return self._state.redirect

    @redirect.setter
    def redirect(self, location: str | None) -> None:
        """Answer ``/jwks.json`` with ``302 Location: location`` (the same JWKS is
        also served at ``/moved.json``, see :attr:`moved_url`)."""
        with self._state.lock:
            self._state.redirect = location

    @property
    def unframed(self) -> bool:
        return self._state.unframed

    @unframed.setter
    def unframed(self, unframed: bool) -> None:
        """Send no content-length (the body ends at connection close), so a client
        cannot reject an oversized body before reading it."""
        with self._state.lock:
            self._state.unframed = unframed

    @property
    def moved_url(self) -> str:
        return self.url.replace("/jwks.json", "/moved.json")

    def hold(self) -> None:
        """Make requests wait (after being counted in ``hits``) until :meth:`release`:
        a fetch that is deterministically in flight."""
        self._state.gate.clear()

    def release(self) -> None:
        """Let held and later requests be answered."""
        self._state.gate.set()

    def stop(self) -> None:
        """Stop serving and close the port (idempotent); later fetches are refused."""
        if self._stopped:
            return
        self._stopped = True
        self.release()
        self._server.shutdown()
        self._server.server_close()
        with self._state.lock:  # kept-alive connections too: a real outage
            sockets = list(self._state.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def __enter__(self) -> JwksServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
