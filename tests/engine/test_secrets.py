"""Tests of engine.secrets and of where the engine applies it: the ``secret`` meta-schema
field, redaction, scrubbing, the admin round trip (restore_document), and config errors
that name a secret field without showing its value."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_config
from engine.definition import load_definition, parse_definition
from engine.errors import ConfigError, DefinitionError
from engine.registry import PolicyRegistry
from engine.secrets import (
    MARKER,
    SECRET_SHOWN_AS,
    SecretSpec,
    document_secrets,
    redact_document,
    redact_url,
    redact_value,
    restore_document,
    scrub,
    secret_strings,
)
from tests.support import policy_folder, registry_from

REPO = Path(__file__).resolve().parents[2]
API_KEY = REPO / "policies" / "apiKey" / "v1.0.0"
RATE_LIMIT_V2 = REPO / "policies" / "rateLimit" / "v2.0.0"

BASE: dict[str, Any] = {
    "name": "x",
    "version": "v1.0.0",
    "description": "d",
    "phases": ["request"],
}
TOKEN = "tok-3f9a1c77e2"
KEY_A = "key-a-51c0e9d2"
KEY_B = "key-b-77aa01fe"
PASSWORD = "hunter2-b81f"


@pytest.fixture(scope="module")
def registry() -> PolicyRegistry:
    return registry_from("secretToken", API_KEY, RATE_LIMIT_V2)


def _definition(parameters: dict[str, Any]) -> Any:
    return parse_definition({**BASE, "parameters": parameters}, "t.yaml")


# --------------------------------------------------------------------------- meta-schema


@pytest.mark.parametrize(
    "parameters",
    [
        pytest.param({"p": {"type": "string", "secret": True}}, id="top-level"),
        pytest.param({"p": {"type": "string", "secret": False}}, id="explicitly-not"),
        pytest.param({"p": {"type": "string", "secret": "urlCredentials"}}, id="url"),
        pytest.param(
            {"p": {"type": "object", "properties": {"k": {"type": "string", "secret": True}}}},
            id="property",
        ),
        pytest.param(
            {"p": {"type": "object", "additionalProperties": {"type": "string", "secret": True}}},
            id="additional-properties",
        ),
        pytest.param({"p": {"type": "array", "items": {"secret": True}}}, id="items"),
    ],
)
def test_meta_schema_accepts_secret(parameters: dict[str, Any]) -> None:
    _definition(parameters)


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        pytest.param(
            {"p": {"type": "string", "secret": "yes"}},
            "t.yaml: parameters.p.secret: 'yes' is not one of [True, False, 'urlCredentials']",
            id="unknown-value",
        ),
        pytest.param(
            {"p": {"type": "integer", "secret": "urlCredentials"}},
            "t.yaml: parameters.p.type: 'string' was expected",
            id="url-credentials-on-an-integer",
        ),
        pytest.param(
            {"p": {"type": "array", "items": {"secret": "urlCredentials"}}},
            "t.yaml: parameters.p.items: 'type' is a required property",
            id="url-credentials-without-type",
        ),
    ],
)
def test_meta_schema_rejects_bad_secret(parameters: dict[str, Any], expected: str) -> None:
    with pytest.raises(DefinitionError) as info:
        _definition(parameters)
    assert any(line.startswith(expected) for line in info.value.errors), info.value.errors


def test_definitions_know_their_secrets() -> None:
    api_key = load_definition(API_KEY / "policy-definition.yaml")
    assert set(api_key.secrets) == {"keys"}
    items = api_key.secrets["keys"].items
    assert items is not None
    assert items.properties["key"].kind == "value"
    assert "consumer" not in items.properties
    rate_limit = load_definition(RATE_LIMIT_V2 / "policy-definition.yaml")
    assert {k: v.kind for k, v in rate_limit.secrets.items()} == {"redisUrl": "urlCredentials"}
    assert load_definition(policy_folder("addHeader") / "policy-definition.yaml").secrets == {}


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "redis://u:pw@h:6379/0", f"redis://u:{MARKER}@h:6379/0", id="user-and-password"
        ),
        pytest.param("rediss://:pw@h", f"rediss://:{MARKER}@h", id="password-only"),
        pytest.param("redis://token@h:1", f"redis://{MARKER}@h:1", id="lone-userinfo"),
        pytest.param("redis://h:6379/2", "redis://h:6379/2", id="no-credentials"),
        pytest.param("redis://u:p@ss@h", f"redis://u:{MARKER}@h", id="at-in-password"),
        pytest.param("redis://[::1", MARKER, id="unparseable"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_value_follows_the_tree() -> None:
    spec = _definition(
        {
            "keys": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "key": {"type": "string", "secret": True},
                        "who": {"type": "string"},
                    },
                },
            }
        }
    ).secrets["keys"]
    value = [{"key": KEY_A, "who": "a"}, {"key": KEY_B, "who": "b"}]
    assert redact_value(value, spec) == [{"key": MARKER, "who": "a"}, {"key": MARKER, "who": "b"}]
    # A value of the wrong shape where a secret is expected may be the secret, misplaced.
    assert redact_value([KEY_A], spec) == [MARKER]
    assert redact_value(KEY_A, spec) == MARKER
    assert value[0]["key"] == KEY_A  # a copy


def test_scrub_url_with_a_short_password() -> None:
    spec = _definition({"url": {"type": "string", "secret": "urlCredentials"}}).secrets["url"]
    url = "redis://u:pw@cache:6379/0"
    text = f"cannot connect to {url}; retrying {url!r}"
    assert scrub(text, secret_strings(url, spec)) == (
        f"cannot connect to {MARKER}; retrying {MARKER!r}"
    )


def test_scrub() -> None:
    text = f"token {TOKEN!r} rejected; route abc; also {TOKEN}"
    assert scrub(text, [TOKEN]) == f"token {MARKER!r} rejected; route abc; also {MARKER}"
    # Short secrets: only their quoted form, so names in the text survive.
    assert scrub("routes[abc]: 'abc' is bad", ["abc"]) == f"routes[abc]: {MARKER!r} is bad"


# --------------------------------------------------------------------------- documents


def _document() -> dict[str, Any]:
    return {
        "routes": {
            "r": {
                "policies": [
                    {
                        "name": "apiKey",
                        "version": "v1.0.0",
                        "parameters": {
                            "keys": [
                                {"key": KEY_A, "consumer": "a"},
                                {"key": KEY_B, "consumer": "b"},
                            ]
                        },
                    },
                    {
                        "name": "rateLimit",
                        "version": "v2.0.0",
                        "parameters": {
                            "requestsPerSecond": 1,
                            "backend": "redis",
                            "redisUrl": f"redis://app:{PASSWORD}@cache.internal:6379/0",
                        },
                    },
                ]
            }
        }
    }


def test_redact_document_and_its_secrets(registry: PolicyRegistry) -> None:
    document = _document()
    shown = redact_document(document, registry)
    entries = shown["routes"]["r"]["policies"]
    assert entries[0]["parameters"]["keys"] == [
        {"key": MARKER, "consumer": "a"},
        {"key": MARKER, "consumer": "b"},
    ]
    assert entries[1]["parameters"]["redisUrl"] == f"redis://app:{MARKER}@cache.internal:6379/0"
    assert document == _document()  # untouched
    assert {KEY_A, KEY_B, PASSWORD} <= document_secrets(document, registry)


def test_restore_keeps_current_values(registry: PolicyRegistry) -> None:
    current = _document()
    submitted = redact_document(current, registry)
    # Operator edits: a consumer renamed, a key added, Redis moved to another host.
    entries = submitted["routes"]["r"]["policies"]
    entries[0]["parameters"]["keys"].append({"key": "key-c-new-0001", "consumer": "c"})
    entries[1]["parameters"]["redisUrl"] = f"redis://app:{MARKER}@cache2.internal:6380/0"
    restored, errors = restore_document(submitted, current, registry)
    assert errors == []
    params = restored["routes"]["r"]["policies"]
    assert params[0]["parameters"]["keys"] == [
        {"key": KEY_A, "consumer": "a"},
        {"key": KEY_B, "consumer": "b"},
        {"key": "key-c-new-0001", "consumer": "c"},
    ]
    assert params[1]["parameters"]["redisUrl"] == f"redis://app:{PASSWORD}@cache2.internal:6380/0"
    assert redact_document(restored, registry) != restored  # the real values are back


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda e: e[0]["parameters"]["keys"].reverse(),
            "routes[r].policies[0] apiKey v1.0.0: keys[0].key: is '<redacted>'",
            id="reordered-items-never-swap-consumers",
        ),
        pytest.param(
            lambda e: e[0]["parameters"]["keys"].append({"key": MARKER, "consumer": "c"}),
            "routes[r].policies[0] apiKey v1.0.0: keys[2].key: is '<redacted>' (how secrets "
            "are shown) but this entry has no current value there to keep; send the value "
            "itself",
            id="new-item",
        ),
        pytest.param(
            lambda e: e.reverse(),
            "routes[r].policies[1] apiKey v1.0.0: keys[0].key: is '<redacted>'",
            id="entry-moved",
        ),
        pytest.param(
            lambda e: e[1]["parameters"].update(
                redisUrl=f"redis://other:{MARKER}@cache.internal:6379/0"
            ),
            "routes[r].policies[1] rateLimit v2.0.0: redisUrl: has '<redacted>' as credentials",
            id="url-of-another-user",
        ),
    ],
)
def test_restore_errors_name_the_field(registry: PolicyRegistry, edit: Any, expected: str) -> None:
    current = _document()
    submitted = redact_document(current, registry)
    edit(submitted["routes"]["r"]["policies"])
    _, errors = restore_document(submitted, current, registry)
    assert any(line.startswith(expected) for line in errors), errors
    assert not any(s in line for line in errors for s in (KEY_A, KEY_B, PASSWORD))


def test_without_a_current_document_every_marker_is_an_error(registry: PolicyRegistry) -> None:
    submitted = redact_document(_document(), registry)
    _, errors = restore_document(submitted, None, registry)
    assert len(errors) == 3, errors
    assert all("no current value is kept here" in line for line in errors)
    # A document without markers comes back as it was.
    assert restore_document(_document(), None, registry) == (_document(), [])


# --------------------------------------------------------------------------- config errors


def _load(registry: PolicyRegistry, params: dict[str, Any], name: str = "secretToken") -> str:
    version = {"secretToken": "v1.0.0", "apiKey": "v1.0.0", "rateLimit": "v2.0.0"}[name]
    entry = {"name": name, "version": version, "parameters": params}
    document = {"routes": {"r": {"policies": [entry]}}}
    with pytest.raises(ConfigError) as info:
        load_config(document, source="t", registry=registry)
    return "\n".join(info.value.errors)


@pytest.mark.parametrize(
    ("entry", "expected", "secret"),
    [
        pytest.param(
            ("secretToken", {"token": "shrt-7"}),
            f"routes[r].policies[0] secretToken v1.0.0: token: {SECRET_SHOWN_AS} is too short",
            "shrt-7",
            id="schema-too-short",
        ),
        pytest.param(
            ("secretToken", {"token": TOKEN, "keys": [{"key": "k-short", "consumer": "a"}]}),
            f"routes[r].policies[0] secretToken v1.0.0: keys[0].key: {SECRET_SHOWN_AS} is too "
            "short",
            "k-short",
            id="schema-nested",
        ),
        pytest.param(
            ("apiKey", {"keys": [KEY_A]}),
            f"routes[r].policies[0] apiKey v1.0.0: keys[0]: {SECRET_SHOWN_AS} is not of type "
            "'object'",
            KEY_A,
            id="apiKey-key-misplaced",
        ),
        pytest.param(
            ("apiKey", {"keys": [{"key": KEY_A, "consumer": "a", "extra": 1}]}),
            "routes[r].policies[0] apiKey v1.0.0: keys[0]: Additional properties are not allowed",
            KEY_A,
            id="apiKey-item-quoted-whole",
        ),
        pytest.param(
            ("secretToken", {"token": f"revoked-{TOKEN}"}),
            f"routes[r].policies[0] secretToken v1.0.0: token: {MARKER!r} is revoked",
            TOKEN,
            id="constructor-quotes-it",
        ),
        pytest.param(
            ("secretToken", {"token": f"crash-{TOKEN}"}),
            "routes[r].policies[0] secretToken v1.0.0: constructor failed: RuntimeError: "
            f"cannot use token {MARKER}",
            TOKEN,
            id="constructor-crash",
        ),
        pytest.param(
            (
                "rateLimit",
                {
                    "requestsPerSecond": 1,
                    "backend": "redis",
                    "redisUrl": f"redis://app:{PASSWORD}@h:6379/cache",
                },
            ),
            "routes[r].policies[0] rateLimit v2.0.0: redisUrl: 'redis://app:<redacted>@h:6379/"
            "cache': database must be a number",
            PASSWORD,
            id="redisUrl-password",
        ),
        pytest.param(
            (
                "rateLimit",
                {"requestsPerSecond": 1, "backend": "redis", "redisUrl": f"http://{PASSWORD}@h"},
            ),
            "routes[r].policies[0] rateLimit v2.0.0: redisUrl: 'http://<redacted>@h': scheme",
            PASSWORD,
            id="redisUrl-lone-userinfo",
        ),
    ],
)
def test_config_errors_name_the_secret_field_not_its_value(
    registry: PolicyRegistry,
    caplog: pytest.LogCaptureFixture,
    entry: tuple[str, dict[str, Any]],
    expected: str,
    secret: str,
) -> None:
    name, params = entry
    with caplog.at_level(logging.DEBUG):
        errors = _load(registry, params, name)
    assert expected in errors, errors
    assert secret not in errors
    assert secret not in caplog.text  # the crash's traceback is logged scrubbed


def test_validation_without_secrets_is_unchanged(registry: PolicyRegistry) -> None:
    errors = _load(registry, {"token": TOKEN, "label": 5})
    assert "label: 5 is not of type 'string'" in errors


def test_secret_spec_child_prefers_named_properties() -> None:
    named = SecretSpec("value")
    spec = SecretSpec(properties={"a": named}, additional=None)
    assert spec.child("a") is named
    assert spec.child("b") is None
