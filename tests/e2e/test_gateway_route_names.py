"""Through a real Envoy: chain keys derived from route names in Envoy Gateway's and Istio's
schemes (``--route-name-pattern``), with the ext_proc filter of the Istio example
(deploy/gateways/istio/policy-engine.yaml) as Envoy's filter config.

Neither product lets an operator set ``x-policy-route`` per route, so these routes carry no
metadata: the engine has only Envoy's ``xds.route_name`` attribute to go on.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.route_names import ENVOY_GATEWAY_PATTERN, ISTIO_PATTERN, RouteNamePattern
from tests.e2e.conftest import Stack, config_text
from tests.e2e.harness import EngineThread, EnvoyProcess, EnvoyRoute, http_request

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[2]
ISTIO_EXAMPLE = REPO / "deploy" / "gateways" / "istio" / "policy-engine.yaml"
ENVOY_GATEWAY_EXAMPLE = REPO / "deploy" / "gateways" / "envoy-gateway" / "policy-engine.yaml"

ENVOY_GATEWAY = ENVOY_GATEWAY_PATTERN
ISTIO = ISTIO_PATTERN

ROUTES = (
    # Envoy Gateway: httproute/<namespace>/<name>/rule/<i>/match/<j>[/<hostname>].
    EnvoyRoute("httproute/shop/orders/rule/0/match/0/shop_example_com", "/eg/orders/", None),
    EnvoyRoute("httproute/shop/orders/rule/1/match/0/shop_example_com", "/eg/orders2/", None),
    EnvoyRoute("httproute/shop/carts/rule/0/match/0", "/eg/carts/", None),
    # Istio: <VirtualService http route name>[.<match name>].
    EnvoyRoute("orders.by-prefix", "/istio/orders/", None),
    EnvoyRoute("carts", "/istio/carts/", None),
    # Named by hand, in neither scheme: the name is the key.
    EnvoyRoute("hand-named", "/hand/", None),
)


def istio_ext_proc() -> dict[str, Any]:
    """The Istio example's ext_proc ``typed_config``, pointed at the test's engine cluster."""
    documents = list(yaml.safe_load_all(ISTIO_EXAMPLE.read_text()))
    (envoy_filter,) = [d for d in documents if d and d["kind"] == "EnvoyFilter"]
    (patch,) = envoy_filter["spec"]["configPatches"]
    assert patch["patch"]["value"]["name"] == "envoy.filters.http.ext_proc"
    config = dict(patch["patch"]["value"]["typed_config"])
    assert config.pop("@type").endswith("ext_proc.v3.ExternalProcessor")
    # Istio's outbound|9002||... cluster is the harness's "ext_proc" cluster here.
    config["grpc_service"] = {**config["grpc_service"], "envoy_grpc": {"cluster_name": "ext_proc"}}
    return config


def add(value: str) -> dict[str, Any]:
    return {
        "name": "addHeader",
        "version": "v1.0.0",
        "parameters": {"header": "x-chain", "value": value},
    }


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[tuple[EngineThread, EnvoyProcess]]:
    """An engine of its own (its route-name pattern changes per test) behind an Envoy whose
    routes are named as the gateways name them and whose ext_proc filter is Istio's."""
    workdir = Path(tempfile.mkdtemp(prefix="gateways-", dir=stack.workdir))
    config = workdir / "policy-config.yaml"
    config.write_text(
        config_text(
            {
                "shop/orders": {"policies": [add("eg-orders")]},
                "shop/carts": {"policies": [add("eg-carts")]},
                "orders": {"policies": [add("istio-orders")]},
                "carts": {"policies": [add("istio-carts")]},
                "hand-named": {"policies": [add("hand")]},
            }
        )
    )
    engine = EngineThread(stack.registry, config)
    try:
        with EnvoyProcess(
            stack.binary,
            workdir,
            engine_port=engine.port,
            upstream_port=stack.upstream.port,
            routes=ROUTES,
            ext_proc=istio_ext_proc(),
        ) as envoy:
            yield engine, envoy
    finally:
        engine.close()


def chain_of(envoy: EnvoyProcess, path: str) -> tuple[int, str | None]:
    reply = http_request(envoy.port, path)
    return reply.status, (reply.echo or {}).get("headers", {}).get("x-chain")


@pytest.mark.parametrize(
    ("path", "status", "chain"),
    [
        pytest.param("/eg/orders/1", 200, "eg-orders", id="route-0"),
        pytest.param("/eg/orders2/1", 200, "eg-orders", id="route-1-same-httproute"),
        pytest.param("/eg/carts/1", 200, "eg-carts", id="no-hostname-part"),
        pytest.param("/hand/1", 200, "hand", id="hand-named"),
        # Istio's names do not match Envoy Gateway's pattern: the whole name is no key.
        pytest.param("/istio/orders/1", 404, None, id="other-scheme-fails-closed"),
    ],
)
def test_envoy_gateway_route_names(gateway, path, status, chain):
    engine, envoy = gateway
    engine.processor.route_names = RouteNamePattern(ENVOY_GATEWAY)
    assert chain_of(envoy, path) == (status, chain)


@pytest.mark.parametrize(
    ("path", "chain"),
    [
        pytest.param("/istio/orders/1", "istio-orders", id="route-and-match-name"),
        pytest.param("/istio/carts/1", "istio-carts", id="route-name-only"),
        pytest.param("/hand/1", "hand", id="hand-named"),
    ],
)
def test_istio_route_names(gateway, path, chain):
    engine, envoy = gateway
    engine.processor.route_names = RouteNamePattern(ISTIO)
    assert chain_of(envoy, path) == (200, chain)


def test_without_a_pattern_generated_names_are_unknown_keys(gateway):
    engine, envoy = gateway
    engine.processor.route_names = None
    assert chain_of(envoy, "/eg/orders/1") == (404, None)
    assert chain_of(envoy, "/hand/1") == (200, "hand")


def test_the_examples_give_the_tested_patterns():
    for path, pattern in ((ENVOY_GATEWAY_EXAMPLE, ENVOY_GATEWAY), (ISTIO_EXAMPLE, ISTIO)):
        assert f"--route-name-pattern '{pattern}'" in path.read_text(), path
