"""engine/timing.py and the route setting ``debug: {timing: true}`` (config, chain flags,
xDS encoding). The ext_proc side: tests/extproc/test_timing.py; through Envoy:
tests/e2e/test_timing.py."""

from __future__ import annotations

from types import MappingProxyType

import jsonschema
import pytest

from engine.chain import Chain, ResponseOutcome
from engine.config import load_config
from engine.config_schema import config_schema
from engine.errors import ConfigError
from engine.policy import ImmediateResponse
from engine.timing import (
    TIMING_HEADER,
    TIMING_KEY,
    format_entry,
    record,
    value,
    with_header,
    without_header,
)
from engine.xds.resources import encode_route, route_chain_to_spec
from tests.support import registry_from

_ENTRY = {"name": "addHeader", "version": "v1.0.0", "parameters": {"header": "x-a", "value": "1"}}


def _chain(route: dict[str, object]) -> Chain:
    registry = registry_from("addHeader")
    return load_config({"routes": {"r": route}}, source="t.yaml", registry=registry).routes["r"]


def test_format_and_record() -> None:
    assert format_entry("jwtValidation", 412_345, response=False, shadow=False) == (
        "jwtValidation;dur=0.412"
    )
    assert format_entry("a", 1_000_000, response=True, shadow=True) == (
        'a;desc="response shadow";dur=1.000'
    )
    metadata: dict[str, object] = {}
    assert value(metadata) is None
    record(metadata, "a", 10_000)
    record(metadata, "b", 20_000, response=True)
    assert metadata[TIMING_KEY] == "a;dur=0.010, b;desc=response;dur=0.020"


def test_with_header_copies_shared_response() -> None:
    shared = ImmediateResponse(status=401, headers={"content-type": "text/plain"})
    assert with_header(shared, {}) is shared
    timed = with_header(shared, {TIMING_KEY: "a;dur=0.010"})
    assert timed.headers == {"content-type": "text/plain", TIMING_HEADER: "a;dur=0.010"}
    assert TIMING_HEADER not in shared.headers


def test_without_header() -> None:
    outcome = ResponseOutcome(set_headers=MappingProxyType({TIMING_HEADER: "a", "x": "1"}))
    assert dict(without_header(outcome).set_headers) == {"x": "1"}
    plain = ResponseOutcome(set_headers=MappingProxyType({"x": "1"}))
    assert without_header(plain) is plain


def test_timed_chain_is_never_static_and_asks_for_responses() -> None:
    untimed = _chain({"policies": [_ENTRY]})
    assert not untimed.timing
    assert untimed.untimed is None
    assert not untimed.needs_response
    timed = _chain({"debug": {"timing": True}, "policies": [_ENTRY]})
    assert timed.timing
    assert timed.needs_response
    assert timed.untimed is not None
    assert not timed.untimed.timing
    empty = _chain({"debug": {"timing": True}, "policies": []})
    assert empty.untimed is None
    assert not empty.needs_response
    assert empty.fully_static


@pytest.mark.parametrize(
    ("debug", "error"),
    [
        (5, "routes[r].debug: must be a mapping such as {timing: true}, got 5"),
        ({"timing": "yes"}, "routes[r].debug.timing: must be true or false, got 'yes'"),
        ({"timng": True}, "routes[r].debug: unknown field 'timng'"),
    ],
    ids=["not-a-mapping", "not-a-bool", "unknown-field"],
)
def test_bad_debug_setting_names_the_field(debug: object, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _chain({"debug": debug, "policies": [_ENTRY]})
    assert error in caught.value.errors


@pytest.mark.parametrize("debug", [None, {"timing": True}, {"timing": False}], ids=str)
def test_xds_round_trip(debug: object) -> None:
    spec: dict[str, object] = {"policies": [_ENTRY]}
    if debug is not None:
        spec["debug"] = debug
    assert route_chain_to_spec(encode_route("r", spec)) == spec


def test_schema_knows_debug_and_mode() -> None:
    schema = config_schema(p.definition for p in registry_from("addHeader"))
    route = {"debug": {"timing": True}, "policies": [{**_ENTRY, "mode": "shadow"}]}
    good = {"routes": {"r": route}}
    jsonschema.Draft202012Validator(schema).validate(good)
    bad = {"routes": {"r": {"debug": {"timing": 1}, "policies": []}}}
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)
