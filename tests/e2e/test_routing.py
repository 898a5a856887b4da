"""Through a real Envoy: route-based chains, header/path/method rewrites, short-circuit and
CEL conditions (spec stories 1, 2 and 4); each scenario over both ext_proc transports
(gRPC and HTTP: the ``e2e_both`` fixture)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.harness import http_request

pytestmark = pytest.mark.envoy


def add(header: str, value: str, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"header": header, "value": value}
    params.update(extra.pop("params", {}))
    return {"name": "addHeader", "version": "v1.0.0", "parameters": params, **extra}


def policy(name: str, **parameters: Any) -> dict[str, Any]:
    return {"name": name, "version": "v1.0.0", "parameters": parameters}


def test_public_and_private_routes_run_different_chains(e2e_both):
    e2e_both.configure(
        {
            "public": {"policies": [add("x-chain", "public")]},
            "private": {"policies": [add("x-chain", "private"), policy("deny")]},
        }
    )
    before = len(e2e_both.upstream.requests_to("/api/v1/private"))
    public = e2e_both.request("/api/v1/public/items")
    assert public.status == 200
    assert public.echo["headers"]["x-chain"] == "public"
    private = e2e_both.request("/api/v1/private/items")
    assert private.status == 401
    assert private.json() == {"error": "denied"}
    assert len(e2e_both.upstream.requests_to("/api/v1/private")) == before


def test_headers_added_modified_removed_before_upstream(e2e_both):
    e2e_both.configure(
        {
            "public": {
                "policies": [
                    add("x-new", "added"),
                    add("x-existing", "modified"),
                    add("x-list", "second", params={"append": True}),
                    policy("rewrite", removeHeaders=["x-remove"]),
                ]
            }
        }
    )
    reply = e2e_both.request(
        "/api/v1/public/h",
        headers={"x-existing": "original", "x-remove": "gone", "x-list": "first", "x-keep": "k"},
    )
    assert reply.status == 200
    seen = reply.echo["headers"]
    assert seen["x-new"] == "added"
    assert seen["x-existing"] == "modified"
    assert seen["x-list"] == "first, second"
    assert seen["x-keep"] == "k"
    assert "x-remove" not in seen


def test_path_and_method_rewrites_reach_upstream(e2e_both):
    e2e_both.configure(
        {
            "public": {
                "policies": [policy("rewrite", path="/api/v1/public/rewritten?x=1", method="PUT")]
            }
        }
    )
    reply = e2e_both.request("/api/v1/public/original", method="GET")
    assert reply.status == 200
    assert (reply.echo["method"], reply.echo["path"]) == ("PUT", "/api/v1/public/rewritten?x=1")


def request_labels(e2e) -> list[str]:
    return [label for label, phase, _ in e2e.recorder_calls() if phase == "request"]


def test_short_circuit_stops_chain_and_upstream_per_request(e2e_both):
    e2e_both.configure(
        {
            "private": {
                "policies": [
                    policy("recorder", label="first"),
                    {**policy("deny"), "condition": '!("x-token" in request.headers)'},
                    policy("recorder", label="later"),
                ]
            }
        }
    )
    before = len(e2e_both.upstream.requests_to("/api/v1/private"))
    denied = e2e_both.request("/api/v1/private/a")
    assert denied.status == 401
    assert request_labels(e2e_both) == ["first"]
    assert len(e2e_both.upstream.requests_to("/api/v1/private")) == before

    # The next request is evaluated afresh: with a token the whole chain runs.
    allowed = e2e_both.request("/api/v1/private/a", headers={"x-token": "t"})
    assert allowed.status == 200
    assert request_labels(e2e_both) == ["first", "first", "later"]
    assert len(e2e_both.upstream.requests_to("/api/v1/private")) == before + 1
    # And again without: short-circuited again.
    assert e2e_both.request("/api/v1/private/a").status == 401


CEL_CHAIN = [
    add("x-api", "1", condition='request.path.startsWith("/cel/api/")'),
    add("x-write", "1", condition='request.method in ["POST", "PUT", "DELETE"]'),
    add("x-flag", "on", params={"metadataKey": "flag"}, condition='request.path.endsWith("/flag")'),
    add("x-flagged", "1", condition='has(metadata.flag) && metadata.flag == "on"'),
    add("x-broken", "1", condition='request.headers["x-missing"] == "1"', onError="failOpen"),
    add("x-after", "1"),
]


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        pytest.param("GET", "/cel/api/users", {"x-api"}, id="path-prefix-match"),
        pytest.param("GET", "/cel/health", set(), id="path-prefix-miss"),
        pytest.param("POST", "/cel/health", {"x-write"}, id="method-in-list"),
        pytest.param("DELETE", "/cel/api/x", {"x-api", "x-write"}, id="both"),
        pytest.param(
            "GET", "/cel/flag", {"x-flag", "x-flagged"}, id="metadata-from-earlier-policy"
        ),
    ],
)
def test_cel_conditions(e2e_both, method, path, expected):
    e2e_both.configure({"cel": {"policies": CEL_CHAIN}})
    reply = e2e_both.request(path, method=method, body=b"" if method != "GET" else None)
    assert reply.status == 200
    headers = reply.echo["headers"]
    present = {h for h in ("x-api", "x-write", "x-flag", "x-flagged", "x-broken") if h in headers}
    assert present == expected
    # A condition failing at runtime (missing header) under failOpen skips only that policy.
    assert headers["x-after"] == "1"


def test_condition_failing_at_request_time_fails_closed(e2e_both):
    # Before: the guard's runtime error skipped the policy, so a client that left the
    # header out bypassed it; now the default failClosed answers errorStatus.
    guarded = add("x-guarded", "1", condition='request.headers["x-internal"] != "true"')
    e2e_both.configure(
        {"cel": {"policies": [{**guarded, "errorStatus": 403}, add("x-after", "1")]}}
    )
    before = len(e2e_both.upstream.requests_to("/cel/"))
    reply = e2e_both.request("/cel/guarded")
    assert reply.status == 403
    assert len(e2e_both.upstream.requests_to("/cel/")) == before
    # With the header present the guard evaluates and the chain runs as configured.
    ok = e2e_both.request("/cel/guarded", headers={"x-internal": "false"})
    assert ok.status == 200
    assert ok.echo["headers"]["x-guarded"] == "1"


@pytest.mark.parametrize(
    ("setting", "status"),
    [
        pytest.param(None, 404, id="default"),
        pytest.param({"action": "deny", "status": 503}, 503, id="deny-503"),
    ],
)
def test_unknown_route_key_is_denied(e2e_both, setting, status):
    # Before: /nochain/ (a key the config does not know) passed through unpoliced.
    top = {"unknownRoute": setting} if setting is not None else {}
    e2e_both.configure({"public": {"policies": [add("x-chain", "public")]}}, **top)
    before = len(e2e_both.upstream.requests_to("/nochain/"))
    reply = e2e_both.request("/nochain/x", headers={"x-client": "c"})
    assert reply.status == status
    assert reply.json() == {"error": "no policy chain for this route"}
    assert len(e2e_both.upstream.requests_to("/nochain/")) == before


def test_missing_route_key_is_denied(stack):
    # No x-policy-route metadata and no xds.route_name attribute: same as an unknown key.
    stack.configure({"nochain": {"policies": []}})
    with stack.other_envoy(ext_proc={"request_attributes": []}) as envoy:
        reply = http_request(envoy.port, "/named/x")
    assert reply.status == 404


def test_unknown_route_key_passes_through_when_allowed(e2e_both):
    e2e_both.configure(
        {"public": {"policies": [add("x-chain", "public")]}}, unknownRoute={"action": "allow"}
    )
    reply = e2e_both.request("/nochain/x", headers={"x-client": "c"})
    assert reply.status == 200
    assert reply.echo["headers"]["x-client"] == "c"
    assert "x-chain" not in reply.echo["headers"]


def test_known_route_with_empty_chain_passes_through(e2e_both):
    e2e_both.configure({"nochain": {"policies": []}})
    reply = e2e_both.request("/nochain/x", headers={"x-client": "c"})
    assert reply.status == 200
    assert reply.echo["headers"]["x-client"] == "c"


def test_route_name_attribute_is_the_fallback_key(e2e_both):
    e2e_both.configure({"named": {"policies": [add("x-named", "yes")]}})
    reply = e2e_both.request("/named/x")
    assert reply.echo["headers"]["x-named"] == "yes"
