"""engine.config_schema: the route configuration's JSON Schema against the engine.

* the demo config (its placeholders filled as tools/demo fills them, both rate-limit
  backends) and the fuzz corpus's base document are valid;
* every document of the fuzz corpus (tests/engine/test_config_fuzz.py) that the engine
  rejects for a reason the schema can express is rejected by the schema too. The reasons
  it cannot express (engine/config_schema.py's docstring) are excluded by name, and the
  test checks that each excluded document's every error is one of them.
"""

from __future__ import annotations

import copy
import re
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker

from engine.config import load_config
from engine.config_schema import config_schema
from engine.definition import (
    DEFINITION_FILE,
    PolicyDefinition,
    data_problems,
    load_definition,
    load_yaml,
)
from engine.errors import ConfigError
from engine.registry import PolicyRegistry
from engine.yamlsafe import YamlError
from tests.engine.test_config_fuzz import BASE, CASES, POLICIES, Case, dump
from tests.support import registry_from

ROOT = Path(__file__).resolve().parents[2]

# Engine error lines the schema cannot express (see engine/config_schema.py).
NOT_EXPRESSIBLE = {
    "CEL condition": re.compile(
        r"^routes\[.*\]\.policies\[\d+\][^:]*: condition: (?!must be a non-empty CEL)"
    ),
    "duration overflow": re.compile(r": timeout: .* is too long to be a duration$"),
}


def _validator(definitions: Iterable[PolicyDefinition]) -> Draft202012Validator:
    schema = config_schema(definitions)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


@pytest.fixture(scope="module")
def fuzz_schema() -> Draft202012Validator:
    return _validator(p.definition for p in registry_from(*POLICIES))


def _manifest_definitions() -> list[PolicyDefinition]:
    """The default manifest's definitions (the schema needs no policy code)."""
    manifest = yaml.safe_load((ROOT / "manifests" / "policy-manifest.yaml").read_text())
    folders = [(ROOT / "manifests" / p["uri"]).resolve() for p in manifest["policies"]]
    return [load_definition(folder / DEFINITION_FILE) for folder in folders]


@pytest.mark.parametrize(
    "backend",
    ["backend: local", "backend: redis, redisUrlEnv: DEMO_REDIS_URL, onBackendError: allow"],
    ids=["local", "redis"],
)
def test_demo_config_is_valid(backend: str) -> None:
    template = string.Template((ROOT / "manifests" / "demo-config.yaml").read_text())
    text = template.substitute(
        JWKS_URL="https://127.0.0.1:43210/jwks.json",
        JWKS_CA="/tmp/demo/ca.pem",
        RATE_LIMIT_BACKEND=backend,
    )
    errors = [e.message for e in _validator(_manifest_definitions()).iter_errors(load_yaml(text))]
    assert errors == []


def test_base_document_is_valid(fuzz_schema: Draft202012Validator) -> None:
    assert [e.message for e in fuzz_schema.iter_errors(copy.deepcopy(BASE))] == []


def _engine_errors(registry: PolicyRegistry, document: Any) -> list[str]:
    try:
        load_config(document, source="fuzz", registry=registry)
    except ConfigError as exc:
        return list(exc.errors)
    return []


def _classify(case: Case, registry: PolicyRegistry) -> tuple[str, Any]:
    """("not a document" | "data limits" | "expressible" | <NOT_EXPRESSIBLE key>, doc)."""
    try:
        document = load_yaml(case.data)
    except (YamlError, ValueError, KeyError):  # KeyError: PyYAML's `!!bool maybe`
        return "not a document", None  # YAML syntax, tags, encoding, alias bombs
    if document is not None and data_problems(document):
        return "data limits", document
    errors = _engine_errors(registry, document)
    assert errors, f"{case.id}: the engine accepts it"
    reasons = set()
    for line in errors:
        kinds = [k for k, pattern in NOT_EXPRESSIBLE.items() if pattern.search(line)]
        if not kinds:
            return "expressible", document
        reasons.update(kinds)
    return " + ".join(sorted(reasons)), document


def test_schema_rejects_what_the_engine_rejects(fuzz_schema: Draft202012Validator) -> None:
    registry = registry_from(*POLICIES)
    counts: dict[str, int] = {}
    accepted = []
    for case in CASES:
        kind, document = _classify(case, registry)
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "expressible" and fuzz_schema.is_valid(document):
            accepted.append(f"{case.id}: {_engine_errors(registry, document)}")
    assert accepted == [], "\n".join(accepted)
    # The exclusions are real and few: most of the corpus is checked.
    assert counts["expressible"] > 100, counts
    assert sum(v for k, v in counts.items() if k in NOT_EXPRESSIBLE) < 40, counts


def test_schema_is_strict_on_unknown_pairs(fuzz_schema: Draft202012Validator) -> None:
    doc: dict[str, Any] = copy.deepcopy(BASE)
    doc["routes"]["public"]["policies"][0]["version"] = "v9.9.9"
    assert not fuzz_schema.is_valid(doc)
    doc["routes"]["public"]["policies"][0] = {"name": "deny", "version": "v1.0.0"}
    assert fuzz_schema.is_valid(doc)


def test_parameters_follow_name_and_version(fuzz_schema: Draft202012Validator) -> None:
    doc: dict[str, Any] = copy.deepcopy(BASE)
    entry: Mapping[str, Any] = doc["routes"]["respond"]["policies"][0]
    entry["parameters"]["status"] = 600
    messages = [e.message for e in fuzz_schema.iter_errors(doc)]
    assert any("600" in m for m in messages), messages
    assert dump(doc)
