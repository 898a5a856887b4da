"""Through a real Envoy: body modes chosen per chain, body/status rewrites, metadata across
phases (spec stories 6 and 7; FR-020, FR-023, FR-024, FR-025..029)."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytestmark = pytest.mark.envoy


def policy(name: str, **parameters: Any) -> dict[str, Any]:
    return {"name": name, "version": "v1.0.0", "parameters": parameters}


def counts(e2e, route: str) -> tuple[int, int]:
    stats = e2e.engine.processor.stats
    return stats.count("request_body", route), stats.count("response_body", route)


def test_header_only_chain_never_receives_a_body(e2e):
    e2e.configure({"public": {"policies": [policy("bodySeen")]}})
    before = counts(e2e, "public")
    reply = e2e.request("/api/v1/public/b", method="POST", body=b"hello")
    assert reply.status == 200
    assert reply.echo["headers"]["x-body-seen"] == "none"
    assert reply.echo["body"] == "hello"
    assert counts(e2e, "public") == before


def test_body_chain_buffers_and_rewrites_request_and_response_bodies(e2e):
    e2e.configure(
        {
            "body": {
                "policies": [
                    policy("bodyWrap"),
                    policy("bodySeen"),
                    policy("rewrite", path="/body/rewritten"),
                ]
            }
        }
    )
    before = counts(e2e, "body")
    reply = e2e.request("/body/x", method="POST", body=b"hello world")
    assert reply.status == 200
    upstream = e2e.upstream.requests_to("/body/rewritten")[-1]
    assert upstream.body == b"<<hello world>>"
    assert upstream.headers["content-length"] == str(len(b"<<hello world>>"))
    assert upstream.headers["x-body-seen"] == str(len(b"<<hello world>>"))
    # The response body was wrapped too, with a matching content-length.
    assert reply.body.startswith(b"<<")
    assert reply.body.endswith(b">>")
    assert json.loads(reply.body[2:-2])["body"] == "<<hello world>>"
    assert reply.headers.get("content-length", str(len(reply.body))) == str(len(reply.body))
    assert counts(e2e, "body") == (before[0] + 1, before[1] + 1)


def test_body_chain_without_request_body_runs_at_headers(e2e):
    e2e.configure({"body": {"policies": [policy("bodyUpper"), policy("bodySeen")]}})
    before = counts(e2e, "body")
    reply = e2e.request("/body/get", method="GET")
    assert reply.status == 200
    assert e2e.upstream.requests_to("/body/get")[-1].headers["x-body-seen"] == "none"
    assert counts(e2e, "body")[0] == before[0]


def test_response_only_body_work_buffers_only_the_response(e2e):
    e2e.configure({"respbody": {"policies": [policy("respBodyUpper")]}})
    before = counts(e2e, "respbody")
    reply = e2e.request(
        "/respbody/x", method="POST", body=b"abc", headers={"x-echo-body": "plain text"}
    )
    assert reply.status == 200
    assert e2e.upstream.requests_to("/respbody/x")[-1].body == b"abc"
    assert reply.body == b"PLAIN TEXT"
    assert counts(e2e, "respbody") == (before[0], before[1] + 1)


@pytest.mark.parametrize(
    "buffered",
    [pytest.param(False, id="at-response-headers"), pytest.param(True, id="with-buffered-body")],
)
def test_response_status_rewrite(e2e, buffered):
    chain = [policy("statusSetter", status=418, removeHeader="x-echo-upstream")]
    if buffered:
        chain.append(policy("respBodyUpper"))
    e2e.configure({"status": {"policies": chain}})
    reply = e2e.request("/status/x", headers={"x-echo-status": "503", "x-echo-body": "down"})
    assert reply.status == 418
    assert "x-echo-upstream" not in reply.headers
    assert reply.body == (b"DOWN" if buffered else b"down")


def test_metadata_written_in_request_phase_is_read_in_response_phase(e2e):
    e2e.configure(
        {
            "meta": {
                "policies": [
                    {
                        "name": "addHeader",
                        "version": "v1.0.0",
                        "parameters": {"header": "x-user", "value": "alice", "metadataKey": "user"},
                    },
                    policy("metadataReader", key="user"),
                ]
            }
        }
    )
    reply = e2e.request("/meta/x")
    assert reply.status == 200
    assert reply.echo["headers"]["x-meta-user"] == "alice"
    assert reply.headers["x-meta-user"] == "alice"


def messages(e2e, route: str) -> dict[str, int]:
    stats = e2e.engine.processor.stats
    kinds = ("request_headers", "request_body", "response_headers", "response_body")
    return {kind: stats.count(kind, route) for kind in kinds}


def test_static_routes_answer_from_prebuilt_replies_and_ask_only_what_they_use(e2e):
    # Request-only: Envoy is not asked for the response at all (before this change, a
    # two-phase policy always had Envoy send the response headers). The hooks raise if
    # called: the replies are the ones built at config load.
    e2e.configure(
        {
            "public": {"policies": [policy("staticHeaders", request={"x-static": "yes"})]},
            "meta": {"policies": [policy("staticHeaders", response={"x-served-by": "engine"})]},
        }
    )
    assert e2e.engine.store.current.chain_for("public").fully_static
    before = messages(e2e, "public"), messages(e2e, "meta")
    for _ in range(2):
        reply = e2e.request("/api/v1/public/s", headers={"x-static": "client"})
        assert reply.status == 200
        assert reply.echo["headers"]["x-static"] == "yes"
        served = e2e.request("/meta/s")
        assert (served.status, served.headers["x-served-by"]) == (200, "engine")
    public, meta = messages(e2e, "public"), messages(e2e, "meta")
    assert public["request_headers"] - before[0]["request_headers"] == 2
    assert public["response_headers"] == before[0]["response_headers"]
    assert meta["response_headers"] - before[1]["response_headers"] == 2
