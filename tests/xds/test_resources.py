"""RouteChain resources <-> configuration documents (engine/xds/resources.py)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import any_pb2, struct_pb2
from policy_engine.v1 import route_chain_pb2

from engine.xds.resources import (
    MAX_RESOURCE_BYTES,
    ROUTE_CHAIN_TYPE,
    decode_resources,
    encode_route,
    route_chain_to_spec,
)
from engine.xds.testing import route_any

FULL_ENTRY: dict[str, Any] = {
    "name": "addHeader",
    "version": "v1.0.0",
    "enabled": False,
    "condition": 'request.method == "GET"',
    "timeout": "250ms",
    "onError": "failOpen",
    "errorStatus": 503,
    "mode": "shadow",
    "parameters": {"header": "x-a", "value": "1", "nested": {"n": 5, "f": 1.5, "l": [1, "a"]}},
}


def test_type_url_is_the_documented_one():
    packed = any_pb2.Any()
    packed.Pack(route_chain_pb2.RouteChain(key="r"))
    assert packed.type_url == ROUTE_CHAIN_TYPE == "type.googleapis.com/policy_engine.v1.RouteChain"


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(FULL_ENTRY, id="every-field"),
        pytest.param({"name": "deny", "version": "v1.0.0"}, id="defaults-stay-absent"),
        pytest.param({"name": "a", "version": "v1.0.0", "timeout": "1.5s"}, id="fractional-s"),
        pytest.param({"name": "a", "version": "v1.0.0", "onError": "failClosed"}, id="closed"),
        pytest.param({"name": "a", "version": "v1.0.0", "mode": "enforce"}, id="enforce"),
    ],
)
def test_round_trip(entry):
    spec = {"policies": [entry]}
    back = route_chain_to_spec(encode_route("r", spec))
    expected = dict(entry)
    if expected.get("timeout") == "1.5s":
        expected["timeout"] = "1500ms"
    assert back == {"policies": [expected]}


def test_whole_struct_numbers_become_ints():
    chain = route_chain_pb2.RouteChain(key="r")
    entry = chain.policies.add(name="rateLimit", version="v1.0.0")
    entry.parameters.update({"rate": 5, "big": 2.0**60, "half": 0.5})
    params = route_chain_to_spec(chain)["policies"][0]["parameters"]
    assert params["rate"] == 5
    assert type(params["rate"]) is int
    assert type(params["big"]) is float  # beyond 2**53 a double is not an exact integer
    assert params["half"] == 0.5


def test_unknown_enum_value_is_passed_to_validation():
    chain = route_chain_pb2.RouteChain(key="r")
    chain.policies.add(name="a", version="v1.0.0", on_error=7)
    assert route_chain_to_spec(chain)["policies"][0]["onError"] == 7
    chain.policies.add(name="a", version="v1.0.0", mode=9)
    assert route_chain_to_spec(chain)["policies"][1]["mode"] == 9


def test_decode_builds_the_document():
    document, errors = decode_resources(
        [route_any("a", {"policies": []}), route_any("b", {"policies": [FULL_ENTRY]})]
    )
    assert errors == []
    assert document == {"routes": {"a": {"policies": []}, "b": {"policies": [FULL_ENTRY]}}}


def _raw(type_url: str, value: bytes) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=value)


def test_decode_names_every_malformed_resource():
    wrong_type = any_pb2.Any()
    wrong_type.Pack(struct_pb2.Struct())
    huge = route_any(
        "huge", {"policies": [{"name": "x" * (MAX_RESOURCE_BYTES + 1), "version": "v"}]}
    )
    document, errors = decode_resources(
        [
            route_any("ok", {"policies": []}),
            wrong_type,
            _raw(ROUTE_CHAIN_TYPE, b"\xff\xff\xff"),
            huge,
            route_any("ok", {"policies": []}),
            route_any("", {"policies": []}),
        ]
    )
    assert document == {"routes": {"ok": {"policies": []}}}
    assert errors[0] == (
        "resources[1]: type URL 'type.googleapis.com/google.protobuf.Struct' is not "
        "type.googleapis.com/policy_engine.v1.RouteChain"
    )
    assert errors[1].startswith("resources[2]: cannot decode as policy_engine.v1.RouteChain")
    assert errors[2].startswith("resources[3]: ")
    assert "over the limit of 1048576 bytes" in errors[2]
    assert errors[3] == "resources[4]: route key 'ok' appears twice (also resources[0])"
    assert errors[4] == "resources[5]: key: must be a non-empty route key"
    assert len(errors) == 5


def test_resource_wrapper_is_unwrapped():
    from envoy.service.discovery.v3 import discovery_pb2

    wrapped = any_pb2.Any()
    wrapped.Pack(discovery_pb2.Resource(name="a", resource=route_any("a", {"policies": []})))
    document, errors = decode_resources([wrapped])
    assert errors == []
    assert document == {"routes": {"a": {"policies": []}}}
