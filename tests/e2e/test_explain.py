"""``<engine> explain`` as shipped: the builder-made engine binary, as a subprocess, on the
demo's configuration (manifests/demo-config.yaml with its placeholders filled as the demo
fills them). No Envoy, no JWKS server, no Redis: explain calls no request hook.

Under Bazel, ``ENGINE_BINARY`` is ``//tests/image/engine`` (every sample policy, the
default manifest's engine); plain pytest runs the same entry
(``engine.main.main(..., registry=...)``) with every sample and test policy.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from policies.jwtValidation.testing import make_pki
from tests.e2e.xds_harness import ENGINE_SCRIPT

REPO = Path(__file__).resolve().parents[2]
DEMO_KEYS = ("demo-partner-key", "demo-staging-key")


def engine_command() -> list[str]:
    binary = os.environ.get("ENGINE_BINARY")
    if binary:  # under Bazel: the builder-made engine
        return [str(Path.cwd() / binary)]
    return [sys.executable, "-c", ENGINE_SCRIPT]


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("explain-e2e")
    pki = make_pki(workdir)  # jwtValidation reads its caFile when constructed
    template = string.Template((REPO / "manifests" / "demo-config.yaml").read_text())
    config = workdir / "demo-config.yaml"
    config.write_text(
        template.substitute(
            JWKS_URL="https://127.0.0.1:9/jwks.json",
            JWKS_CA=str(pki.ca_file),
            RATE_LIMIT_BACKEND="backend: local",
        )
    )
    return config


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*engine_command(), "explain", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def explained(config: Path, *args: str) -> dict[str, Any]:
    done = run("--config", str(config), "--json", *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_partner_route_condition_on_metadata(demo_config: Path) -> None:
    staging = explained(
        demo_config,
        "--route", "partner",
        "--header", "x-api-key: some-key",
        "--metadata", "apiKey.consumer=partner-staging",
    )  # fmt: skip
    api_key, debug, verified = staging["entries"]
    assert api_key["request"]["runs"].startswith("runs (its hook decides")
    assert api_key["explanation"]["consumers"] == ["partner-prod", "partner-staging"]
    assert debug["request"]["condition"]["value"] is True
    assert debug["request"]["applies"] == {"setHeaders": {"x-debug": "true"}}
    assert verified["request"]["runs"] == "runs (static action)"
    assert staging["result"]["staticChanges"]["headers"] == {
        "x-debug": "true",
        "x-partner-verified": "yes",
    }
    prod = explained(
        demo_config, "--route", "partner", "--metadata", "apiKey.consumer=partner-prod"
    )
    condition = prod["entries"][1]["request"]["condition"]
    assert condition["value"] is False
    assert condition["reads"] == {'metadata["apiKey.consumer"]': "partner-prod"}
    for result in (staging, prod):
        text = json.dumps(result)
        assert not [key for key in DEMO_KEYS if key in text]


def test_text_output_of_the_maintenance_route(demo_config: Path) -> None:
    done = run("--config", str(demo_config), "--route", "maintenance", "--path", "/x")
    assert done.returncode == 0, done.stderr
    assert "[0] respond v1.0.0: enforce, failClosed (500)" in done.stdout
    assert "result: the request is answered by respond v1.0.0 (503)" in done.stdout


def test_private_route_explains_jwt_and_rate_limit(demo_config: Path) -> None:
    result = explained(demo_config, "--route", "private", "--path", "/orders")
    jwt, limiter = result["entries"]
    assert jwt["explanation"]["issuer"] == "https://idp.test/"
    assert jwt["explanation"]["audiences"] == ["orders-api"]
    assert limiter["explanation"]["per"] == "metadata jwt.sub"
    assert result["result"]["decidedAtRunTime"] == ["jwtValidation v1.0.0", "rateLimit v2.0.0"]


def test_unknown_route_and_errors(demo_config: Path) -> None:
    unknown = explained(demo_config, "--route", "nope")
    assert unknown["result"]["request"].startswith("is answered 404")
    ambiguous = run("--config", str(demo_config))
    assert ambiguous.returncode == 1
    assert "explain: route: which route? the configuration has 6:" in ambiguous.stderr
    missing = run("--route", "partner")
    assert missing.returncode == 2
    assert "--config" in missing.stderr
    helped = run("--help")
    assert helped.returncode == 0
    assert "No policy hook is called" in " ".join(helped.stdout.split())
