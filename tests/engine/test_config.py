"""Tests of engine.config: validation messages, snapshot building, instance reuse."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from engine.config import canonical_json, load_config, load_config_file
from engine.errors import ConfigError
from engine.registry import PolicyRegistry
from tests.support import policy_folder, registry_from, write_policy

JWT_DEFINITION = """
    name: jwtValidation
    version: {version}
    description: Test double of the JWT policy's parameters.
    phases: [request]
    parameters:
      jwksUrl:
        type: string
        required: true
        format: uri
        pattern: "^https://"
        errorMessage: must be HTTPS
      issuer:
        type: string
        required: true
"""

FUSSY_CODE = """
    class Policy:
        def __init__(self, params):
            kind = params.get("fail")
            if kind == "value":
                raise ValueError("mode and fail do not mix")
            if kind == "runtime":
                raise RuntimeError("cannot open cache")

        def on_request(self, ctx):
            return None
"""

FUSSY_DEFINITION = """
    name: fussy
    version: v1.0.0
    description: Constructor fails on demand.
    phases: [request]
    parameters:
      fail: {type: string}
"""

JWT_OK = {"jwksUrl": "https://idp.example/jwks.json", "issuer": "https://idp.example"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> PolicyRegistry:
    root = tmp_path_factory.mktemp("policies")
    jwt = [
        write_policy(root, "jwtValidation", v, definition=JWT_DEFINITION.format(version=v))
        for v in ("v1.0.0", "v2.0.0")
    ]
    fussy = write_policy(root, "fussy", definition=FUSSY_DEFINITION, code=FUSSY_CODE)
    return registry_from(
        policy_folder("addHeader"), policy_folder("recorder"), policy_folder("sleeper"), fussy, *jwt
    )


def load(registry: PolicyRegistry, routes: dict[str, Any], **kwargs: Any) -> Any:
    return load_config({"routes": routes}, source="test.yaml", registry=registry, **kwargs)


def errors_of(registry: PolicyRegistry, document: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(document, source="test.yaml", registry=registry)
    assert info.value.source == "test.yaml"
    return list(info.value.errors)


def route(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"policies": list(entries)}


def add_header(**extra: Any) -> dict[str, Any]:
    return {
        "name": "addHeader",
        "version": "v1.0.0",
        "parameters": {"header": "x-a", "value": "1"},
        **extra,
    }


def test_yaml_config_builds_chains(registry: PolicyRegistry) -> None:
    text = textwrap.dedent(
        """
        routes:
          public:
            policies:
              - name: addHeader
                version: v1.0.0
                condition: 'request.path.startsWith("/api/")'
                timeout: 500ms
                onError: failOpen
                errorStatus: 503
                parameters: {header: x-a, value: "1"}
              - name: recorder
                version: v1.0.0
                enabled: false
                parameters: {label: disabled}
          private:
            policies: []
        """
    )
    snapshot = load_config(text, source="routes.yaml", registry=registry)
    assert (snapshot.source, snapshot.version) == ("routes.yaml", 1)
    assert list(snapshot.routes) == ["public", "private"]
    public = snapshot.chain_for("public")
    assert public is not None
    [entry] = public.policies
    assert (entry.name, entry.version, entry.timeout, entry.fail_open, entry.error_status) == (
        "addHeader",
        "v1.0.0",
        0.5,
        True,
        503,
    )
    assert entry.condition is not None
    assert entry.condition.expression == 'request.path.startsWith("/api/")'
    assert (entry.has_request, entry.has_response) == (True, False)
    assert entry.instance.append is False  # default filled in before construction
    private = snapshot.chain_for("private")
    assert private is not None
    assert private.policies == ()
    assert snapshot.chain_for("missing") is None


def test_entry_defaults(registry: PolicyRegistry) -> None:
    snapshot = load(registry, {"r": route(add_header())})
    [entry] = snapshot.chain_for("r").policies
    assert (entry.condition, entry.timeout, entry.fail_open, entry.error_status) == (
        None,
        None,
        False,
        500,
    )


def test_content_hash_is_canonical(registry: PolicyRegistry) -> None:
    one = load(registry, {"r": route(add_header()), "s": route()})
    two = load(registry, {"s": route(), "r": route(add_header())})
    assert one.content_hash == two.content_hash
    assert one.content_hash != load(registry, {"r": route()}).content_hash


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param(
            {
                "name": "jwtValidation",
                "version": "v1.0.0",
                "parameters": {**JWT_OK, "jwksUrl": "http://x"},
            },
            "routes[r].policies[0] jwtValidation v1.0.0: jwksUrl must be HTTPS",
            id="parameter",
        ),
        pytest.param(
            {"name": "jwtValidation", "version": "v1.0.0", "parameters": {}},
            "routes[r].policies[0] jwtValidation v1.0.0: missing required parameter(s): "
            "issuer, jwksUrl",
            id="missing-parameters",
        ),
        pytest.param(
            {"name": "jwtValidation", "version": "v3.0.0", "parameters": JWT_OK},
            "routes[r].policies[0] jwtValidation v3.0.0: policy 'jwtValidation' version v3.0.0 "
            "is not in this engine (versions available: v1.0.0, v2.0.0)",
            id="unknown-version",
        ),
        pytest.param(
            {"name": "rateLimit", "version": "v1.0.0"},
            "routes[r].policies[0] rateLimit v1.0.0: policy 'rateLimit' is not in this engine "
            "(policies available: addHeader, fussy, jwtValidation, recorder, sleeper)",
            id="unknown-policy",
        ),
        pytest.param(
            add_header(priority=1),
            "routes[r].policies[0]: unknown field 'priority'",
            id="unknown-field",
        ),
        pytest.param(
            add_header(condition="request.path.("),
            "routes[r].policies[0] addHeader v1.0.0: condition: 1:14: Syntax error: "
            "no viable alternative at input '.('",
            id="condition-syntax",
        ),
        pytest.param(
            add_header(condition="requets.path == '/'"),
            "routes[r].policies[0] addHeader v1.0.0: condition: 1:8: undeclared reference to "
            "'requets.path' (in container '')",
            id="condition-undeclared",
        ),
        pytest.param(
            add_header(condition='request.Pth.startsWith("/api/")'),
            "routes[r].policies[0] addHeader v1.0.0: condition: 1:8: undefined field 'Pth' in "
            "request (it has: path, method, headers, id, route, metadata, Path, Method, "
            "Headers, Metadata)",
            id="condition-unknown-field",
        ),
        pytest.param(
            add_header(condition='request.path.matches("[")'),
            "routes[r].policies[0] addHeader v1.0.0: condition: matches('['): invalid regular "
            "expression: missing ]: [",
            id="condition-bad-regex",
        ),
        pytest.param(
            add_header(condition="response.status == 200"),
            "routes[r].policies[0] addHeader v1.0.0: condition: reads response, but addHeader "
            "runs only in the request phase, where there is no response yet",
            id="condition-response-in-request-phase",
        ),
        pytest.param(
            add_header(timeout="soon"),
            "routes[r].policies[0] addHeader v1.0.0: timeout: 'soon' is not a duration "
            "(expected e.g. '250ms', '1s', '2m', '1h')",
            id="timeout",
        ),
        pytest.param(
            add_header(timeout="0ms"),
            "routes[r].policies[0] addHeader v1.0.0: timeout: must be greater than 0",
            id="timeout-zero",
        ),
        pytest.param(
            add_header(onError="ignore"),
            "routes[r].policies[0] addHeader v1.0.0: onError: 'ignore' is not one of failOpen, "
            "failClosed",
            id="on-error",
        ),
        pytest.param(
            add_header(onError=["failOpen"]),
            "routes[r].policies[0] addHeader v1.0.0: onError: ['failOpen'] is not one of "
            "failOpen, failClosed",
            id="on-error-list",
        ),
        pytest.param(
            add_header(errorStatus=200),
            "routes[r].policies[0] addHeader v1.0.0: errorStatus: must be an integer in 400-599, "
            "got 200",
            id="error-status",
        ),
        pytest.param(
            add_header(enabled="no"),
            "routes[r].policies[0] addHeader v1.0.0: enabled: must be true or false, got 'no'",
            id="enabled",
        ),
        pytest.param(
            add_header(parameters=["x"]),
            "routes[r].policies[0] addHeader v1.0.0: parameters: must be a mapping, got list",
            id="parameters-type",
        ),
        pytest.param(
            {"version": "v1.0.0"}, "routes[r].policies[0]: missing field 'name'", id="no-name"
        ),
        pytest.param(
            {"name": "addHeader", "version": 1},
            "routes[r].policies[0]: version: must be a string, got 1",
            id="version-type",
        ),
        pytest.param(
            "addHeader",
            "routes[r].policies[0]: must be a mapping with 'name' and 'version'",
            id="entry-type",
        ),
        pytest.param(
            add_header(parameters={"header": "x-a", "value": "a\nb"}),
            "routes[r].policies[0] addHeader v1.0.0: value: must not contain a newline",
            id="constructor-parameter-error",
        ),
        pytest.param(
            {"name": "fussy", "version": "v1.0.0", "parameters": {"fail": "value"}},
            "routes[r].policies[0] fussy v1.0.0: mode and fail do not mix",
            id="constructor-value-error",
        ),
        pytest.param(
            {"name": "fussy", "version": "v1.0.0", "parameters": {"fail": "runtime"}},
            "routes[r].policies[0] fussy v1.0.0: constructor failed: RuntimeError: "
            "cannot open cache",
            id="constructor-crash",
        ),
    ],
)
def test_entry_errors(registry: PolicyRegistry, entry: Any, expected: str) -> None:
    assert errors_of(registry, {"routes": {"r": route(entry)}}) == [expected]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(None, "configuration is empty (expected a mapping with 'routes')", id="empty"),
        pytest.param(["routes"], "expected a mapping with 'routes', got list", id="list"),
        pytest.param({}, "missing field 'routes'", id="no-routes"),
        pytest.param({"routes": {}, "version": 2}, "unknown field 'version'", id="unknown-top"),
        pytest.param(
            {"routes": ["a"]},
            "routes: must be a mapping of route key -> route, got ['a']",
            id="routes-list",
        ),
        pytest.param(
            {"routes": {"r": {}}},
            "routes[r]: missing field 'policies' (use [] for a pass-through route)",
            id="no-policies",
        ),
        pytest.param(
            {"routes": {"r": {"policies": {}}}},
            "routes[r].policies: must be a list, got dict",
            id="policies-type",
        ),
        pytest.param(
            {"routes": {"r": {"policies": [], "x": 1}}},
            "routes[r]: unknown field 'x'",
            id="route-field",
        ),
        pytest.param(
            {"routes": {"r": []}},
            "routes[r]: must be a mapping with a 'policies' list",
            id="route-type",
        ),
        pytest.param(
            {"routes": {7: route()}},
            "routes: keys must be strings, got 7",
            id="route-key",
        ),
        pytest.param(
            {"routes": {"": route()}},
            "routes['']: route key must be a non-empty string",
            id="route-key-empty",
        ),
    ],
)
def test_document_errors(registry: PolicyRegistry, document: Any, expected: str) -> None:
    assert errors_of(registry, document) == [expected]


def test_every_error_is_collected(registry: PolicyRegistry) -> None:
    document = {
        "routes": {
            "public": route(add_header(), {**add_header(), "priority": 1}),
            "private": route(
                {
                    "name": "jwtValidation",
                    "version": "v1.0.0",
                    "parameters": {"jwksUrl": "http://x"},
                },
                add_header(timeout="1x", onError="nope"),
            ),
        }
    }
    assert errors_of(registry, document) == [
        "routes[public].policies[1]: unknown field 'priority'",
        "routes[private].policies[0] jwtValidation v1.0.0: missing required parameter(s): issuer",
        "routes[private].policies[0] jwtValidation v1.0.0: jwksUrl must be HTTPS",
        "routes[private].policies[1] addHeader v1.0.0: timeout: '1x' is not a duration "
        "(expected e.g. '250ms', '1s', '2m', '1h')",
        "routes[private].policies[1] addHeader v1.0.0: onError: 'nope' is not one of failOpen, "
        "failClosed",
    ]


def test_yaml_syntax_error_names_file_and_line(registry: PolicyRegistry, tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("routes:\n  r:\n    policies: [\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path, registry)
    assert info.value.source == str(path)
    assert info.value.errors == (
        "YAML: line 4, column 1: while parsing a flow node; did not find expected node content",
    )
    assert str(info.value).startswith(f"{path}: 1 configuration error(s):\n  - YAML: line 4")


def test_unreadable_file(registry: PolicyRegistry, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_file(tmp_path / "missing.yaml", registry)
    assert info.value.errors == ("cannot read: No such file or directory",)


def test_disabled_entries_are_validated_but_not_constructed(registry: PolicyRegistry) -> None:
    crashing = {"name": "fussy", "version": "v1.0.0", "parameters": {"fail": "runtime"}}
    snapshot = load(registry, {"r": route({**crashing, "enabled": False})})
    assert snapshot.chain_for("r").policies == ()
    invalid = {**add_header(parameters={"header": "X"}), "enabled": False}
    assert errors_of(registry, {"routes": {"r": route(invalid)}}) == [
        "routes[r].policies[0] addHeader v1.0.0: missing required parameter(s): value",
        "routes[r].policies[0] addHeader v1.0.0: header: 'X' does not match '^[a-z0-9-]+$'",
    ]


def test_instances_are_reused_across_reloads(registry: PolicyRegistry) -> None:
    first = load(
        registry, {"r": route(add_header(), add_header(parameters={"header": "x-b", "value": "2"}))}
    )
    same, changed = first.chain_for("r").policies
    second = load(
        registry,
        {
            "r": route(add_header(condition="true", timeout="1s")),
            "s": route(add_header(), add_header(parameters={"header": "x-b", "value": "3"})),
        },
        previous=first,
    )
    assert second.version == 2
    [r0] = second.chain_for("r").policies
    s0, s1 = second.chain_for("s").policies
    # Identity is (route, name, version, params): condition/timeout do not matter,
    # the route does (per-route state such as rate-limit buckets is never shared).
    assert r0.instance is same.instance
    assert s0.instance is not same.instance
    assert s1.instance is not changed.instance
    assert s1.instance.value == "3"


def test_identical_entries_on_two_routes_get_their_own_instances(
    registry: PolicyRegistry,
) -> None:
    snapshot = load(registry, {"a": route(add_header()), "b": route(add_header())})
    [a0] = snapshot.chain_for("a").policies
    [b0] = snapshot.chain_for("b").policies
    assert a0.instance is not b0.instance


def test_failed_reload_leaves_previous_untouched(registry: PolicyRegistry) -> None:
    first = load(registry, {"r": route(add_header())})
    with pytest.raises(ConfigError):
        load(registry, {"r": route(add_header(onError="x"))}, previous=first)
    assert first.chain_for("r").policies[0].instance.value == "1"


def test_canonical_json() -> None:
    assert canonical_json({"b": [1, {"d": 2, "c": "é"}], "a": None}) == (
        '{"a":null,"b":[1,{"c":"é","d":2}]}'
    )


@pytest.mark.parametrize(
    ("setting", "status"),
    [
        pytest.param(None, 404, id="default-deny-404"),
        pytest.param({"action": "deny"}, 404, id="deny"),
        pytest.param({"action": "deny", "status": 403}, 403, id="deny-403"),
        pytest.param({"status": 503}, 503, id="status-only-means-deny"),
        pytest.param({"action": "allow"}, None, id="allow"),
    ],
)
def test_unknown_route_setting(registry: PolicyRegistry, setting: Any, status: int | None) -> None:
    document: dict[str, Any] = {"routes": {}}
    if setting is not None:
        document["unknownRoute"] = setting
    snapshot = load_config(document, source="test.yaml", registry=registry)
    if status is None:
        assert snapshot.unknown_route is None
    else:
        assert snapshot.unknown_route is not None
        assert snapshot.unknown_route.status == status
        assert snapshot.unknown_route.body == b'{"error": "no policy chain for this route"}'


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        pytest.param("deny", "unknownRoute: must be a mapping with 'action'", id="not-mapping"),
        pytest.param({"action": "pass"}, "unknownRoute: action: 'pass' is not one of", id="action"),
        pytest.param(
            {"status": 200}, "unknownRoute: status: must be an integer in 400-599", id="2xx"
        ),
        pytest.param({"status": True}, "unknownRoute: status: must be an integer", id="bool"),
        pytest.param(
            {"action": "allow", "status": 404},
            "unknownRoute: status: only allowed with action: deny",
            id="allow-with-status",
        ),
        pytest.param({"actoin": "deny"}, "unknownRoute: unknown field 'actoin'", id="typo"),
    ],
)
def test_unknown_route_errors(registry: PolicyRegistry, setting: Any, expected: str) -> None:
    [error] = errors_of(registry, {"routes": {}, "unknownRoute": setting})
    assert error.startswith(expected)


# --------------------------------------------------------------------------- hostile input


SLEEPER = "routes:\n  r:\n    policies:\n      - {name: sleeper, version: v1.0.0, %s}\n"
SLEEPER_AT = "routes[r].policies[0] sleeper v1.0.0"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            "parameters: {seconds: .nan}",
            f"{SLEEPER_AT}: seconds: must be a finite number, got nan",
            id="nan-passes-minimum",
        ),
        pytest.param(
            "parameters: {seconds: .inf}",
            f"{SLEEPER_AT}: seconds: must be a finite number, got inf",
            id="inf",
        ),
        pytest.param(
            "parameters: {seconds: " + "7" * 4000 + "}",
            f"{SLEEPER_AT}: seconds: must fit in 64 bits, got an integer of 13288 bits",
            id="int-4000-digits",
        ),
        pytest.param(
            "parameters: {seconds: " + "7" * 5000 + "}",
            "YAML: line 4, column 64: cannot read '7777777777777777777777777777777777777777... "
            "(5000 characters)' as int: Exceeds the limit (4300 digits) for integer string "
            "conversion: value has 5000 digits",
            id="int-5000-digits",
        ),
        pytest.param(
            "parameters: {seconds: !!int abc}",
            "YAML: line 4, column 64: cannot read 'abc' as int: invalid literal for int() "
            "with base 10: 'abc'",
            id="int-tag",
        ),
        pytest.param(
            "parameters: {seconds: !!float abc}",
            "YAML: line 4, column 64: cannot read 'abc' as float: could not convert string "
            "to float: 'abc'",
            id="float-tag",
        ),
        pytest.param(
            "parameters: {seconds: !!timestamp notadate}",
            "YAML: line 4, column 64: tag '!!timestamp' is not supported (configuration is "
            "JSON-like: strings, numbers, booleans, null, lists and mappings)",
            id="timestamp-tag",
        ),
        pytest.param(
            "parameters: {seconds: 2026-13-45}",
            f"{SLEEPER_AT}: seconds: '2026-13-45' is not of type 'number'",
            id="bad-date-value",
        ),
        pytest.param(
            "parameters: {2026-13-45: 1}",
            f"{SLEEPER_AT}: unknown parameter '2026-13-45'",
            id="bad-date-key",
        ),
        pytest.param(
            "timeout: " + "9" * 400 + "s",
            f"{SLEEPER_AT}: timeout: '9999999999999999999999999999999999999999'... is too "
            "long to be a duration",
            id="duration-overflows",
        ),
    ],
)
def test_hostile_scalars_are_config_errors_naming_the_field(
    registry: PolicyRegistry, tmp_path: Path, fields: str, expected: str
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(SLEEPER % fields)
    with pytest.raises(ConfigError) as info:
        load_config_file(path, registry)
    assert info.value.lines() == [f"{path}: {expected}"]


def test_parsed_document_gets_the_yaml_limits(registry: PolicyRegistry) -> None:
    shared: Any = [route()] * 100
    for _ in range(4):
        shared = [shared] * 100
    cyclic: dict[str, Any] = {"policies": []}
    cyclic["policies"].append(cyclic)
    assert errors_of(registry, {"routes": {"r": route(), "x": shared}}) == [
        "too many values (is some part shared many times over?)"
    ]
    assert errors_of(registry, {"routes": {"r": cyclic}})[0].endswith(
        ": nested more than 64 levels deep"
    )


def test_error_lines_stay_short_whatever_the_value(registry: PolicyRegistry) -> None:
    errors = errors_of(registry, {"routes": ["x" * 1_000_000] * 1000})
    assert len(errors) == 1
    assert len(errors[0]) < 300


def test_two_phase_policy_may_pick_the_response_phase(registry: PolicyRegistry) -> None:
    entry = {"name": "recorder", "version": "v1.0.0", "parameters": {"label": "x"}}
    snapshot = load(registry, {"r": route({**entry, "condition": "has(response.Status)"})})
    condition = snapshot.routes["r"].policies[0].condition
    assert condition is not None
    assert condition.reads_response


PLANNED_DEFINITION = """
    name: planned
    version: v1.0.0
    description: Answers phases() and static_*() as its parameters say.
    phases: [request, response]
    requiresRequestBody: true
    requiresResponseBody: true
    parameters:
      phases: {type: array, items: {type: string}}
      bodies: {type: array, items: {type: string}}
      static: {type: string}
"""

PLANNED_CODE = """
    from engine.policy import RequestModifications, ResponseModifications

    class Policy:
        def __init__(self, params):
            self.params = params
            if "phases" in params:
                # ["str"]: a bare string, a classic slip
                self.phases = lambda: "request" if params["phases"] == ["str"] else params["phases"]
            if "bodies" in params:
                self.bodies = lambda: params["bodies"]
            kind = params.get("static")
            if kind is not None:
                self.static_request = self._static_request
                self.static_response = lambda: None

        def _static_request(self):
            kind = self.params["static"]
            if kind == "raise":
                raise RuntimeError("no static answer today")
            if kind == "wrong-type":
                return "x-a: 1"
            if kind == "bad-header":
                return RequestModifications(set_headers={"x a": "1"})
            return RequestModifications(set_headers={"x-a": "1"})

        def on_request(self, ctx):
            return None

        def on_response(self, ctx):
            return None
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> PolicyRegistry:
    root = tmp_path_factory.mktemp("planned")
    return registry_from(
        write_policy(root, "planned", definition=PLANNED_DEFINITION, code=PLANNED_CODE)
    )


def planned_entry(**params: Any) -> dict[str, Any]:
    return {"name": "planned", "version": "v1.0.0", "parameters": params}


def test_phases_narrow_what_envoy_is_asked_for(planned: PolicyRegistry) -> None:
    chains = load(
        planned,
        {
            "both": route(planned_entry()),
            "request": route(planned_entry(phases=["request"])),
            "response": route(planned_entry(phases=["response"])),
            "none": route(planned_entry(phases=[])),
        },
    ).routes
    both, request, response = chains["both"], chains["request"], chains["response"]
    assert (both.requires_request_body, both.needs_response) == (True, True)
    # Request only: no response headers or body from Envoy on this policy's account.
    assert (request.requires_request_body, request.needs_response) == (True, False)
    assert request.response_policies == ()
    # Response only: the request body goes with the request phase it dropped.
    assert (response.requires_request_body, response.requires_response_body) == (False, True)
    assert response.request_policies == ()
    assert chains["none"].policies == ()


def test_bodies_narrow_the_bodies_envoy_buffers(planned: PolicyRegistry) -> None:
    # Both phases used, only the response body read (jsonTransform on a response-only
    # route: its request phase sets accept-encoding, it never reads request bodies).
    chains = load(
        planned,
        {
            "response-body": route(planned_entry(bodies=["response"])),
            "no-body": route(planned_entry(bodies=[])),
        },
    ).routes
    chain = chains["response-body"]
    assert (chain.requires_request_body, chain.requires_response_body) == (False, True)
    assert [p.has_request for p in chain.policies] == [True]
    assert chain.request_head == chain.request_policies  # runs at the request headers
    assert (chains["no-body"].requires_request_body, chains["no-body"].needs_response) == (
        False,
        True,
    )


def test_static_actions_are_taken_at_load(planned: PolicyRegistry) -> None:
    chain = load(planned, {"r": route(planned_entry(static="ok"))}).routes["r"]
    (policy,) = chain.policies
    assert policy.static_request is not None
    assert policy.static_request.set_headers == {"x-a": "1"}
    # static_response() said None: the response phase is dropped.
    assert (policy.has_request, policy.has_response) == (True, False)
    assert not chain.needs_response
    # The body requirement keeps the chain off the static path (the body policy runs).
    assert chain.static_request_outcome is None


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"phases": ["request", "trailers"]}, "phases() returned ['trailers'], not among"),
        ({"phases": ["str"]}, "phases() must return phase names"),
        ({"bodies": ["trailers"]}, "bodies() returned ['trailers'], not among the bodies"),
        ({"static": "raise"}, "RuntimeError: no static answer today"),
        ({"static": "wrong-type"}, "static_request() returned str, not a RequestAction"),
        ({"static": "bad-header"}, "set_headers: 'x a' is not a valid header name"),
    ],
)
def test_wrong_load_time_answers_are_config_errors_naming_the_entry(
    planned: PolicyRegistry, params: dict[str, Any], expected: str
) -> None:
    errors = errors_of(planned, {"routes": {"r": route(planned_entry(**params))}})
    assert len(errors) == 1
    assert errors[0].startswith("routes[r].policies[0] planned v1.0.0: "), errors[0]
    assert expected in errors[0]
