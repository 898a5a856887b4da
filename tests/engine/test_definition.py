"""Tests of engine.definition: the meta-schema, parameter validation, durations, YAML."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from engine.definition import (
    PolicyDefinition,
    YamlError,
    data_problems,
    load_definition,
    load_yaml,
    parse_definition,
    parse_duration,
    version_key,
)
from engine.errors import DefinitionError
from tests.support import POLICIES_DIR

SOURCE = "policies/x/v1.0.0/policy-definition.yaml"

MINIMAL: dict[str, Any] = {
    "name": "jwtValidation",
    "version": "v1.0.0",
    "description": "Validates JWTs",
    "phases": ["request"],
}

JWT_PARAMETERS: dict[str, Any] = {
    "jwksUrl": {
        "type": "string",
        "required": True,
        "format": "uri",
        "pattern": "^https://",
        "errorMessage": "must be HTTPS",
    },
    "issuer": {"type": "string", "required": True},
    "requestsPerSecond": {"type": "number", "exclusiveMinimum": 0, "default": 10},
    "burst": {"type": "integer", "minimum": 1, "maximum": 100},
    "keyHeader": {"type": "string", "pattern": "^[A-Za-z0-9-]+$"},
    "cacheTtl": {"type": "string", "format": "duration", "default": "5m"},
    "audiences": {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "minItems": 1,
        "uniqueItems": True,
    },
    "claims": {
        "type": "object",
        "properties": {"sub": {"type": "string"}, "level": {"type": "integer"}},
        "required": ["sub"],
        "additionalProperties": False,
    },
    "mode": {"type": "string", "enum": ["strict", "lenient"]},
}

VALID = {"jwksUrl": "https://idp.example/jwks.json", "issuer": "https://idp.example"}


def definition(**overrides: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


@pytest.fixture(scope="module")
def jwt() -> PolicyDefinition:
    return parse_definition(definition(parameters=JWT_PARAMETERS), SOURCE)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "folder",
    sorted(POLICIES_DIR.glob("*/*")),
    ids=lambda p: f"{p.parent.name}-{p.name}",
)
def test_every_test_policy_definition_loads(folder: Path) -> None:
    loaded = load_definition(folder / "policy-definition.yaml")
    assert (loaded.name, loaded.version) == (folder.parent.name, folder.name)
    assert loaded.check_examples() == []


def test_parse_fills_fields_and_defaults(jwt: PolicyDefinition) -> None:
    assert jwt.key == ("jwtValidation", "v1.0.0")
    assert jwt.phases == frozenset({"request"})
    assert (jwt.has_request_phase, jwt.has_response_phase) == (True, False)
    assert (jwt.requires_request_body, jwt.requires_response_body) == (False, False)
    assert jwt.source == SOURCE
    assert jwt.examples == ()
    schema = jwt.parameters_schema
    assert schema["required"] == ["issuer", "jwksUrl"]
    assert schema["additionalProperties"] is False
    assert "errorMessage" not in schema["properties"]["jwksUrl"]
    assert schema["properties"]["claims"]["required"] == ["sub"]


def test_phases_and_body_flags() -> None:
    both = parse_definition(
        definition(
            phases=["response", "request"], requiresRequestBody=True, requiresResponseBody=True
        ),
        SOURCE,
    )
    assert (both.has_request_phase, both.has_response_phase) == (True, True)
    assert (both.requires_request_body, both.requires_response_body) == (True, True)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {"phases": ["both"]},
            "phases[0]: 'both' is not one of ['request', 'response']",
            id="phase",
        ),
        pytest.param({"phases": []}, "phases: [] should be non-empty", id="no-phases"),
        pytest.param(
            {"phases": ["request", "request"]},
            "phases: ['request', 'request'] has non-unique elements",
            id="duplicate-phase",
        ),
        pytest.param({"name": None}, "'name' is a required property", id="missing-name"),
        pytest.param(
            {"name": "JwtValidation"},
            "name: 'JwtValidation' does not match '^[a-z][A-Za-z0-9]*$'",
            id="name-pattern",
        ),
        pytest.param({"version": "1.0.0"}, "version: '1.0.0' does not match", id="version"),
        pytest.param(
            {"priority": 3},
            "Additional properties are not allowed ('priority' was unexpected)",
            id="unknown-top-level-key",
        ),
        pytest.param(
            {"requiresRequestBody": "yes"},
            "requiresRequestBody: 'yes' is not of type 'boolean'",
            id="body-flag-type",
        ),
        pytest.param(
            {"parameters": {"a": {"type": "str"}}},
            "parameters.a.type: 'str' is not one of",
            id="param-type",
        ),
        pytest.param(
            {"parameters": {"a": {"required": True}}},
            "parameters.a: 'type' is a required property",
            id="param-without-type",
        ),
        pytest.param(
            {"parameters": {"a": {"type": "string", "minLenght": 1}}},
            "parameters.a: Unevaluated properties are not allowed ('minLenght' was unexpected)",
            id="param-unknown-keyword",
        ),
        pytest.param(
            {"parameters": {"a": {"type": "string", "required": "yes"}}},
            "parameters.a.required: 'yes' is not of type 'boolean'",
            id="param-required-not-bool",
        ),
        pytest.param(
            {"parameters": {"a": {"type": "string", "pattern": "(unclosed"}}},
            "parameters.a.pattern: '(unclosed' is not a 'regex'",
            id="param-bad-regex",
        ),
        pytest.param(
            {"parameters": {"a": {"type": "string", "format": "email"}}},
            "parameters.a.format: 'email' is not one of ['uri', 'duration']",
            id="param-unknown-format",
        ),
        pytest.param(
            {"parameters": {"a": {"type": "integer", "minimum": "0"}}},
            "parameters.a.minimum: '0' is not of type 'number'",
            id="param-minimum-type",
        ),
        pytest.param(
            {"parameters": {"a": {"type": "array", "items": {"type": "string", "required": True}}}},
            "parameters.a.items.required: True is not of type 'array'",
            id="nested-required-must-be-list",
        ),
        pytest.param(
            {"parameters": {"a-b": {"type": "string"}}},
            "parameters: 'a-b' does not match",
            id="param-name",
        ),
        pytest.param(
            {"examples": [{"description": "x", "parameters": {}}]},
            "examples[0]: 'valid' is a required property",
            id="example-missing-valid",
        ),
    ],
)
def test_meta_schema_rejections(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(DefinitionError) as info:
        parse_definition(definition(**overrides), SOURCE)
    assert f"{SOURCE}: {expected}" in info.value.errors[0]
    assert len(info.value.errors) == 1


def test_all_meta_schema_violations_are_reported_at_once() -> None:
    data = definition(name="Bad", phases=["both"], extra=1, parameters={"a": {"type": "x"}})
    with pytest.raises(DefinitionError) as info:
        parse_definition(data, SOURCE)
    assert info.value.errors == (
        f"{SOURCE}: Additional properties are not allowed ('extra' was unexpected)",
        f"{SOURCE}: name: 'Bad' does not match '^[a-z][A-Za-z0-9]*$'",
        f"{SOURCE}: parameters.a.type: 'x' is not one of "
        "['string', 'integer', 'number', 'boolean', 'array', 'object']",
        f"{SOURCE}: phases[0]: 'both' is not one of ['request', 'response']",
    )
    assert str(info.value) == "\n".join(info.value.errors)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            {"type": "integer", "minimum": 0, "default": -1},
            "parameters.a.default: -1 is less than the minimum of 0",
            id="default-out-of-range",
        ),
        pytest.param(
            {"type": "string", "format": "duration", "default": "soon"},
            "parameters.a.default: 'soon' is not a 'duration'",
            id="default-bad-format",
        ),
        pytest.param(
            {"type": "string", "required": True, "default": "x"},
            "parameters.a: a required parameter cannot have a default",
            id="required-with-default",
        ),
    ],
)
def test_default_must_satisfy_its_spec(spec: dict[str, Any], expected: str) -> None:
    with pytest.raises(DefinitionError, match="default") as info:
        parse_definition(definition(parameters={"a": spec}), SOURCE)
    assert info.value.errors == (f"{SOURCE}: {expected}",)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(DefinitionError, match=f"^{SOURCE}: expected a mapping at the top level"):
        parse_definition(["name"], SOURCE)


def test_load_definition_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "policy-definition.yaml"
    path.write_text("name: a\nphases: [request\n")
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    assert str(info.value).startswith(f"{path}: line 3, column 1: while parsing a flow sequence")


def test_load_definition_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


# --------------------------------------------------------------------------- parameters


def test_valid_parameters_get_defaults(jwt: PolicyDefinition) -> None:
    normalised, errors = jwt.validate_parameters(VALID)
    assert errors == []
    assert normalised == {**VALID, "requestsPerSecond": 10, "cacheTtl": "5m"}


def test_normalised_parameters_are_copies() -> None:
    spec = {"type": "array", "items": {"type": "string"}, "default": ["a"]}
    loaded = parse_definition(
        definition(parameters={"tags": spec, "o": {"type": "object"}}), SOURCE
    )
    given = {"o": {"k": ["v"]}}
    first, _ = loaded.validate_parameters(given)
    first["tags"].append("changed")
    first["o"]["k"].append("changed")
    second, _ = loaded.validate_parameters(given)
    assert second == {"tags": ["a"], "o": {"k": ["v"]}}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param(
            {"jwksUrl": "http://idp.example/jwks"}, ["jwksUrl must be HTTPS"], id="error-message"
        ),
        pytest.param({"jwksUrl": "https://"}, ["jwksUrl must be HTTPS"], id="error-message-format"),
        pytest.param(
            {"requestsPerSecond": -1},
            ["requestsPerSecond: -1 is less than or equal to the minimum of 0"],
            id="exclusive-minimum",
        ),
        pytest.param(
            {"burst": 101}, ["burst: 101 is greater than the maximum of 100"], id="maximum"
        ),
        pytest.param({"burst": 1.5}, ["burst: 1.5 is not of type 'integer'"], id="integer"),
        pytest.param({"burst": True}, ["burst: True is not of type 'integer'"], id="bool-not-int"),
        pytest.param(
            {"keyHeader": "x y"},
            ["keyHeader: 'x y' does not match '^[A-Za-z0-9-]+$'"],
            id="pattern",
        ),
        pytest.param(
            {"cacheTtl": "5 minutes"}, ["cacheTtl: '5 minutes' is not a 'duration'"], id="duration"
        ),
        pytest.param(
            {"audiences": ["a", "a", ""]},
            [
                "audiences: ['a', 'a', ''] has non-unique elements",
                "audiences[2]: '' should be non-empty",
            ],
            id="array-items",
        ),
        pytest.param(
            {"claims": {"level": "x", "extra": 1}},
            [
                "claims: 'sub' is a required property",
                "claims: Additional properties are not allowed ('extra' was unexpected)",
                "claims.level: 'x' is not of type 'integer'",
            ],
            id="nested-object",
        ),
        pytest.param(
            {"mode": "loose"}, ["mode: 'loose' is not one of ['strict', 'lenient']"], id="enum"
        ),
        pytest.param({"foo": 1}, ["unknown parameter 'foo'"], id="unknown"),
    ],
)
def test_parameter_rejections(
    jwt: PolicyDefinition, params: dict[str, Any], expected: list[str]
) -> None:
    _, errors = jwt.validate_parameters({**VALID, **params})
    assert sorted(errors) == sorted(expected)


def test_missing_required_parameters_are_one_sorted_message(jwt: PolicyDefinition) -> None:
    _, errors = jwt.validate_parameters({"burst": 0, "zzz": 1})
    assert errors == [
        "missing required parameter(s): issuer, jwksUrl",
        "burst: 0 is less than the minimum of 1",
        "unknown parameter 'zzz'",
    ]


def test_non_mapping_parameters(jwt: PolicyDefinition) -> None:
    assert jwt.validate_parameters(["x"]) == ({}, ["parameters must be a mapping, not list"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("https://idp.example/jwks.json", True),
        ("https://idp.example:8443", True),
        ("idp.example/jwks.json", False),
        ("https:///jwks.json", False),
        ("https://idp example", False),
    ],
    ids=["full", "port", "no-scheme", "no-host", "space"],
)
def test_uri_format(value: str, ok: bool) -> None:
    loaded = parse_definition(
        definition(parameters={"u": {"type": "string", "format": "uri"}}), SOURCE
    )
    _, errors = loaded.validate_parameters({"u": value})
    assert errors == ([] if ok else [f"u: {value!r} is not a 'uri'"])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("1s", 1.0), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), ("0s", 0.0)],
    ids=["ms", "s", "fraction", "m", "h", "zero"],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_version_key_sorts_numerically() -> None:
    versions = ["v1.10.0", "v2.0.0", "v1.9.3", "v1.9.10"]
    assert sorted(versions, key=version_key) == ["v1.9.3", "v1.9.10", "v1.10.0", "v2.0.0"]
    assert version_key("v1.2.3") == (1, 2, 3)


@pytest.mark.parametrize("text", ["", "1", "-1s", "1 s", "1d", "s", "1.s", 5], ids=repr)
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_check_examples_reports_misbehaving_examples() -> None:
    examples = [
        {"description": "ok", "parameters": {"n": 1}, "valid": True},
        {"description": "should pass", "parameters": {"n": -1}, "valid": True},
        {"description": "should fail", "parameters": {"n": 1}, "valid": False},
        {"description": "wrong text", "parameters": {"n": -1}, "valid": False, "error": "HTTPS"},
        {"description": "right text", "parameters": {"n": -1}, "valid": False, "error": "minimum"},
    ]
    loaded = parse_definition(
        definition(parameters={"n": {"type": "integer", "minimum": 0}}, examples=examples), SOURCE
    )
    assert loaded.check_examples() == [
        "examples[1] (should pass): expected valid, got: n: -1 is less than the minimum of 0",
        "examples[2] (should fail): expected an error, got none",
        "examples[3] (wrong text): expected an error containing 'HTTPS', "
        "got: n: -1 is less than the minimum of 0",
    ]


# --------------------------------------------------------------------------- YAML


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: 1\na: 2\n", "line 2, column 1: while constructing a mapping; found duplicate key 'a'"),
        ("a: b: c\n", "line 1, column 5: mapping values are not allowed in this context"),
        (
            "a: [1\n",
            "line 2, column 1: while parsing a flow sequence; did not find expected ',' or ']'",
        ),
        ("a: !!python/name:os.system x\n", "line 1, column 4: tag '!!python/name:os.system' is"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "line 1, column 1003: while increasing flow"),
    ],
    ids=["duplicate-key", "syntax", "unclosed", "unsafe-tag", "too-deep"],
)
def test_load_yaml_errors(text: str, expected: str) -> None:
    with pytest.raises(YamlError) as info:
        load_yaml(text)
    assert str(info.value).startswith(expected)


def test_load_yaml_allows_merge_keys() -> None:
    text = "base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n"
    assert load_yaml(text)["derived"] == {"x": 1, "y": 3}


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("^[a-z-]+$", "x-key", True),
        # Python's `$` alone would accept a trailing newline; JSON Schema's (ECMA) does not.
        ("^[a-z-]+$", "x-key\n", False),
        ("^[a-z-]+$", "x-key\r\n", False),
        ("^[$a-z]+$", "$ab", True),  # `$` inside a class is a character
        (r"^cost\$$", "cost$", True),  # an escaped `$` is a character
        (r"^cost\$$", "cost$\n", False),
        ("^(a|b$)", "b\n", False),
        ("^https://", "https://x\n", True),  # no `$`: a prefix check, as in ECMA
    ],
    ids=[
        "plain",
        "trailing-lf",
        "trailing-crlf",
        "dollar-in-class",
        "escaped-dollar",
        "escaped-dollar-then-lf",
        "dollar-in-group",
        "no-anchor",
    ],
)
def test_pattern_dollar_means_end_of_input(pattern: str, value: str, matches: bool) -> None:
    definition = parse_definition(
        {
            "name": "p",
            "version": "v1.0.0",
            "description": "pattern semantics",
            "phases": ["request"],
            "parameters": {"v": {"type": "string", "pattern": pattern}},
        },
        "p.yaml",
    )
    _, errors = definition.validate_parameters({"v": value})
    assert (errors == []) == matches, errors
    if not matches:
        assert errors == [f"v: {value!r} does not match {pattern!r}"]


# --------------------------------------------------------------------------- data problems


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param({"rate": float("nan")}, ["rate: must be a finite number, got nan"], id="nan"),
        pytest.param(
            {"a": [1, {"b": float("-inf")}]},
            ["a[1].b: must be a finite number, got -inf"],
            id="inf",
        ),
        pytest.param({"n": 2**63}, ["n: must fit in 64 bits, got 9223372036854775808"], id="2^63"),
        pytest.param(
            {"n": -(10**4000)}, ["n: must fit in 64 bits, got an integer of 13288 bits"], id="huge"
        ),
        pytest.param({"m": {1: "x"}}, ["m: keys must be strings, got 1"], id="int-key"),
        pytest.param({"n": 2**63 - 1, "f": 1e308, "b": True}, [], id="in-range"),
    ],
)
def test_data_problems(value: Any, expected: list[str]) -> None:
    assert data_problems(value) == expected


def test_data_problems_bounds_depth_and_shared_parts() -> None:
    deep: Any = []
    for _ in range(1000):
        deep = [deep]
    assert data_problems({"d": deep}) == ["d" + "[0]" * 63 + ": nested more than 64 levels deep"]
    shared: Any = ["x"] * 100
    for _ in range(5):
        shared = [shared] * 100  # 10^12 values once expanded
    assert data_problems(shared) == ["too many values (is some part shared many times over?)"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameter_is_rejected_despite_exclusive_minimum(bad: float) -> None:
    loaded = parse_definition(
        definition(parameters={"rate": {"type": "number", "exclusiveMinimum": 0}}), SOURCE
    )
    assert loaded.validate_parameters({"rate": bad})[1] == [
        f"rate: must be a finite number, got {bad}"
    ]


def test_non_finite_number_in_a_definition_is_rejected() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_definition(
            definition(parameters={"rate": {"type": "number", "minimum": float("nan")}}), SOURCE
        )
    assert info.value.errors == (
        f"{SOURCE}: parameters.rate.minimum: must be a finite number, got nan",
    )


def test_duration_too_long_for_a_float() -> None:
    with pytest.raises(ValueError, match="too long to be a duration"):
        parse_duration("9" * 400 + "s")
