"""Constructor checks at submission (issue 20 item 4): with the engine's policy code
(``<engine> controlplane``), the policies declaring ``pure_constructor = True`` are
constructed on every submission, so their ``ParameterError`` is a 400; the others (and
the definitions-only control plane) are not constructed."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.definitions import (
    ValidatedParameters,
    checking_registry,
    load_validation_registry,
    pure_policies,
)
from controlplane.testing import ControlPlane, admin_call, write_definitions
from engine.errors import DefinitionError
from engine.registry import PolicyRegistry, load_policy

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted(p for p in (REPO / "policies").glob("*/v*") if p.is_dir())

BAD_HEADER = {
    "policies": [
        {
            "name": "setHeader",
            "version": "v1.0.0",
            "parameters": {"request": {"set": {"x bad": "1"}}},
        }
    ]
}
MISSING_CA = {
    "policies": [
        {
            "name": "jwtValidation",
            "version": "v2.0.0",
            "parameters": {
                "jwksUrl": "https://idp.example/jwks.json",
                "issuer": "https://idp.example/",
                "audiences": ["orders"],
                "caFile": "/nonexistent/on/the/control/plane/ca.pem",
            },
        }
    ]
}


@pytest.fixture(scope="module")
def definitions(tmp_path_factory: pytest.TempPathFactory) -> PolicyRegistry:
    path = tmp_path_factory.mktemp("defs") / "engine_definitions.json"
    write_definitions(path, SAMPLES, {"target": "//generated/test:engine"})
    return load_validation_registry(path).registry


@pytest.fixture(scope="module")
def code() -> PolicyRegistry:
    return PolicyRegistry(load_policy(folder) for folder in SAMPLES)


async def serving(registry: PolicyRegistry, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(registry, token_file=tmp_path / "tokens")
    await plane.start()
    try:
        yield plane
    finally:
        assert await plane.stop() == 0


@pytest.fixture
async def checking(
    definitions: PolicyRegistry, code: PolicyRegistry, tmp_path: Path
) -> AsyncIterator[ControlPlane]:
    async for plane in serving(checking_registry(definitions, code), tmp_path):
        yield plane


def test_only_policies_declaring_a_pure_constructor_are_constructed(
    definitions: PolicyRegistry, code: PolicyRegistry
) -> None:
    registry = checking_registry(definitions, code)
    assert pure_policies(registry) == [
        "apiKey v1.0.0",
        "jsonTransform v1.0.0",
        "llmUsage v1.0.0",
        "rateLimit v1.0.0",
        "respond v1.0.0",
        "setHeader v1.0.0",
        "sseGuard v1.0.0",
        "uploadGuard v1.0.0",
    ]
    # jwtValidation reads caFile, rateLimit v2 reads redisUrlEnv: never on the control plane.
    # They record their parameters, and carry the code's pure explain() hook (POST /explain).
    for name, version in (("jwtValidation", "v2.0.0"), ("rateLimit", "v2.0.0")):
        factory = registry.get(name, version).factory
        assert isinstance(factory, type)
        assert issubclass(factory, ValidatedParameters)
        recorded = factory({"requestsPerSecond": 1, "issuer": "i", "audiences": [], "jwksUrl": "u"})
        hook = getattr(recorded, "explain", None)
        assert hook is not None
        assert hook is getattr(code.get(name, version).factory, "explain")  # noqa: B009
    # The definitions file's entries are the ones validated against.
    assert (
        registry.get("setHeader", "v1.0.0").definition
        is definitions.get("setHeader", "v1.0.0").definition
    )


async def test_a_constructor_check_is_a_400_at_submission(checking: ControlPlane) -> None:
    status, body = await admin_call(checking, "PUT", "/routes/r?wait=5", BAD_HEADER)
    assert status == 400
    assert body == {
        "errors": [
            "routes[r].policies[0] setHeader v1.0.0: request.set.x bad: "
            "'x bad' is not a valid header name (an HTTP token)"
        ]
    }
    assert checking.table.routes() == {}


async def test_a_constructor_needing_the_engine_host_is_left_to_the_engine(
    checking: ControlPlane,
) -> None:
    status, body = await admin_call(checking, "PUT", "/routes/r", MISSING_CA)
    assert status == 200, body


async def test_definitions_only_accepts_what_only_a_constructor_rejects(
    definitions: PolicyRegistry, tmp_path: Path
) -> None:
    async for plane in serving(definitions, tmp_path):
        status, _ = await admin_call(plane, "PUT", "/routes/r", BAD_HEADER)
        assert status == 200  # the engines NACK it: see /status


def test_code_of_another_build_is_refused(definitions: PolicyRegistry) -> None:
    def hashed(registry: PolicyRegistry, digest: str) -> PolicyRegistry:
        return PolicyRegistry(dataclasses.replace(p, content_hash=digest) for p in registry)

    code = PolicyRegistry(load_policy(folder) for folder in SAMPLES)
    with pytest.raises(DefinitionError, match="content hash sha256:b of the code differs"):
        checking_registry(hashed(definitions, "sha256:a"), hashed(code, "sha256:b"))
    partial = PolicyRegistry(p for p in code if p.name != "respond")
    with pytest.raises(DefinitionError, match=r"respond v1\.0\.0: definition without code"):
        checking_registry(definitions, partial)
