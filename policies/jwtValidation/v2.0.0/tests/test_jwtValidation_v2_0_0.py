"""Tests of jwtValidation v2.0.0 against a real HTTPS JWKS server on 127.0.0.1.

The cases every version shares live in policies/jwtValidation/common_cases.py and
run here against this version through the ``policy`` fixture; this module adds
what is particular to v2.0.0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.policy import RequestModifications
from engine.registry import RegisteredPolicy, load_policy
from engine.testing import construct, example_id, valid_examples

# Every shared case and fixture (common_cases.__all__), so that pytest collects them
# here: a case added there runs for every version without a list to keep here.
from policies.jwtValidation.common_cases import *  # noqa: F403
from policies.jwtValidation.common_cases import BASE, assert_invalid_token, ctx
from policies.jwtValidation.testing import JwksServer, KeySet, Pki, claims

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


# --------------------------------------------------------------------------- new in v2


@pytest.mark.parametrize(
    ("token_claims", "expected"),
    [
        pytest.param(
            {"sub": "user-1", "email": "u@example.com"},
            {"x-jwt-sub": "user-1", "x-jwt-email": "u@example.com"},
            id="strings",
        ),
        pytest.param(
            {"sub": "u", "email": None, "roles": ["a", "b"], "admin": False, "level": 3},
            {
                "x-jwt-sub": "u",
                "x-jwt-roles": '["a","b"]',
                "x-jwt-admin": "false",
                "x-jwt-level": "3",
            },
            id="json-values-and-absent-claim",
        ),
        pytest.param(
            {"sub": "u", "email": "a@b.c\r\nx-admin: true"},
            {"x-jwt-sub": "u"},
            id="crlf-in-claim-not-forwarded",
        ),
        pytest.param(
            {"sub": "u", "email": None, "Org": "acme"},
            {"x-jwt-sub": "u", "x-jwt-org": "acme"},
            id="header-name-lower-cased",
        ),
    ],
)
async def test_claims_copied_to_headers(
    make: Callable[..., Any],
    keys: KeySet,
    token_claims: dict[str, Any],
    expected: dict[str, str],
) -> None:
    policy = make(claimHeaders=["sub", "email", "roles", "admin", "level", "Org"])
    action = await policy.on_request(ctx(keys.rsa.sign(claims(**token_claims))))
    assert isinstance(action, RequestModifications)
    assert dict(action.set_headers) == expected
    assert action.remove_headers == ()


async def test_incoming_prefixed_headers_are_removed(
    make: Callable[..., Any], keys: KeySet
) -> None:
    request = ctx(keys.rsa.sign(claims(email=None)))
    request.headers.update(
        {"x-jwt-sub": "admin", "x-jwt-email": "spoof@x", "x-jwt-role": "root", "x-other": "1"}
    )
    action = await make(claimHeaders=["sub", "email"]).on_request(request)
    assert isinstance(action, RequestModifications)
    assert dict(action.set_headers) == {"x-jwt-sub": "alice"}
    assert sorted(action.remove_headers) == ["x-jwt-email", "x-jwt-role"]


async def test_custom_prefix_and_no_claim_headers(make: Callable[..., Any], keys: KeySet) -> None:
    request = ctx(keys.rsa.sign(claims()))
    request.headers["x-auth-sub"] = "spoofed"
    action = await make(headerPrefix="X-Auth-").on_request(request)
    assert action == RequestModifications(remove_headers=("x-auth-sub",))
    assert await make().on_request(ctx(keys.rsa.sign(claims()))) is None


async def test_rejected_token_sets_no_headers(make: Callable[..., Any], keys: KeySet) -> None:
    action = await make(claimHeaders=["sub"]).on_request(ctx(keys.rotated.sign(claims())))
    assert_invalid_token(action, "no usable key")


def test_v2_parameters_are_unknown_to_v1() -> None:
    v1 = load_policy(FOLDER.parent / "v1.0.0").definition
    _, errors = v1.validate_parameters({**BASE, "claimHeaders": ["sub"]})
    assert errors == ["unknown parameter 'claimHeaders'"]


# --------------------------------------------------------------------------- spoofed claim headers


async def test_underscore_and_case_spellings_of_claim_headers_are_removed(
    make: Callable[..., Any], keys: KeySet
) -> None:
    """Issue 8 item 17: CGI-style upstreams read x_jwt_sub as HTTP_X_JWT_SUB."""
    request = ctx(keys.rsa.sign(claims()))
    request.headers.update(
        {"x_jwt_sub": "admin", "x_jwt_role": "root", "x-jwt_email": "x", "x-jwtish": "kept"}
    )
    action = await make(claimHeaders=["sub"]).on_request(request)
    assert isinstance(action, RequestModifications)
    assert dict(action.set_headers) == {"x-jwt-sub": "alice"}
    assert sorted(action.remove_headers) == ["x-jwt_email", "x_jwt_role", "x_jwt_sub"]


def test_strip_request_headers_ignores_case_and_underscores(make: Callable[..., Any]) -> None:
    policy = make(headerPrefix="X_Auth-")
    headers = {"X-AUTH-sub": "1", "x_auth_role": "2", "x-auth-": "3", "x-authz": "4", "y": "5"}
    assert policy.strip_request_headers(headers) == ("X-AUTH-sub", "x_auth_role", "x-auth-")


@pytest.mark.parametrize(
    ("options", "authorization"),
    [
        pytest.param(
            {"condition": 'request.path.startsWith("/private")'}, None, id="condition-false"
        ),
        pytest.param(
            # A failing condition fails the policy; only under failOpen does the request go
            # on without it, so that is where stripping matters.
            {"condition": 'request.headers["missing"] == "x"', "onError": "failOpen"},
            None,
            id="condition-error-failopen",
        ),
        pytest.param({"timeout": "50ms", "onError": "failOpen"}, "unknown-kid", id="failed-open"),
    ],
)
async def test_claim_headers_are_stripped_when_the_policy_does_not_process_the_request(
    server: JwksServer,
    pki: Pki,
    keys: KeySet,
    options: dict[str, str],
    authorization: str | None,
) -> None:
    """Issue 8 item 17: the executor skips a policy whose condition is false (or
    fails under failOpen), and goes on without one that failed open, so the policy itself cannot
    strip: the chain asks it what to strip."""
    from engine.chain import run_request
    from engine.config import load_config
    from engine.registry import PolicyRegistry
    from engine.testing import make_request_context

    server.hold()  # a fetch never completes: the failOpen case times out
    entry = {
        "name": "jwtValidation",
        "version": "v2.0.0",
        **options,
        "parameters": {
            **BASE,
            "jwksUrl": server.url,
            "caFile": str(pki.ca_file),
            "claimHeaders": ["sub"],
        },
    }
    snapshot = load_config(
        {"routes": {"r": {"policies": [entry]}}},
        source="test",
        registry=PolicyRegistry([POLICY]),
    )
    chain = snapshot.chain_for("r")
    assert chain is not None
    headers = {"x-jwt-sub": "admin", "X_JWT_ROLE": "root", "x-other": "1"}
    if authorization:
        headers["authorization"] = f"Bearer {keys.rotated.sign(claims())}"
    request = make_request_context(path="/public/x", headers=headers)
    try:
        outcome = await run_request(chain, request)
    finally:
        server.release()
        for policy in chain.policies:  # let a fetch finish: a cancelled one may leak
            await policy.instance.jwks.settle()  # its socket on Python 3.11
    assert outcome.immediate is None
    assert sorted(outcome.remove_headers) == ["x-jwt-sub", "x_jwt_role"]
    if not authorization:
        assert server.hits == 0  # the policy itself never ran
