"""Tests of jwtValidation v1.0.0 against a real HTTPS JWKS server on 127.0.0.1.

The cases every version shares live in policies/jwtValidation/common_cases.py and
run here against this version through the ``policy`` fixture; this module adds
what is particular to v1.0.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.registry import RegisteredPolicy, load_policy
from engine.testing import construct, example_id, valid_examples

# Every shared case and fixture (common_cases.__all__), so that pytest collects them
# here: a case added there runs for every version without a list to keep here.
from policies.jwtValidation.common_cases import *  # noqa: F403
from policies.jwtValidation.common_cases import BASE

FOLDER = Path(__file__).resolve().parents[1]
POLICY = load_policy(FOLDER)


@pytest.fixture(scope="module")
def policy() -> RegisteredPolicy:
    """The version under test, for the shared cases and fixtures."""
    return POLICY


def test_definition_examples_behave_as_declared() -> None:
    assert POLICY.check_examples() == []


@pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
def test_valid_examples_construct_without_network(example: Mapping[str, Any]) -> None:
    construct(POLICY, example["parameters"])


def test_config_error_names_route_policy_and_field() -> None:
    """User story 8, scenario 1, through the real configuration loader."""
    from engine.config import load_config
    from engine.errors import ConfigError
    from engine.registry import PolicyRegistry

    entry = {"name": "jwtValidation", "version": "v1.0.0", "parameters": BASE}
    document = {
        "routes": {
            "private": {
                "policies": [{**entry, "parameters": {**BASE, "jwksUrl": "http://idp.test/jwks"}}]
            },
            "public": {"policies": [entry]},
        }
    }
    with pytest.raises(ConfigError) as info:
        load_config(document, source="test", registry=PolicyRegistry([POLICY]))
    assert info.value.errors == (
        "routes[private].policies[0] jwtValidation v1.0.0: jwksUrl must be HTTPS",
    )
