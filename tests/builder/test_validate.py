"""builder.validate: every validation failure, its message, and that nothing is produced.

Each failure case runs twice: through :func:`builder.validate.validate` (the exact
message) and through the builder's CLI with a fake Bazel (exit code 1, the report on
stderr, no generated package, Bazel never started).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder import build
from builder.errors import ValidationError
from builder.manifest import load_manifest
from builder.testing import policy_code, write_manifest, write_policy
from builder.validate import check_policy_code, validate


@dataclass
class Case:
    """A manifest in ``tmp`` whose validation fails with lines containing ``expected``."""

    setup: Callable[[Path], None]
    expected: list[str]


def _one(tmp: Path, **kwargs: object) -> None:
    write_policy(tmp / "p" / "custom" / "v1.0.0", **kwargs)  # type: ignore[arg-type]
    write_manifest(tmp / "policy-manifest.yaml", [{"name": "custom", "uri": "p/custom/v1.0.0"}])


def _entry(tmp: Path, name: str, uri: str, version: str | None = None) -> None:
    entry = {"name": name, "uri": uri} | ({"version": version} if version else {})
    write_manifest(tmp / "policy-manifest.yaml", [entry])


def _conflict(tmp: Path) -> None:
    write_policy(tmp / "a" / "custom", name="custom")
    write_policy(tmp / "b" / "custom", name="custom")
    write_manifest(
        tmp / "policy-manifest.yaml",
        [{"name": "custom", "uri": "a/custom"}, {"name": "custom", "uri": "b/custom"}],
    )


def _uri_is_file(tmp: Path) -> None:
    (tmp / "f").write_text("")
    _entry(tmp, "custom", "f")


def _definition_missing(tmp: Path) -> None:
    _one(tmp)
    (tmp / "p/custom/v1.0.0/policy-definition.yaml").unlink()


def _version_mismatch(tmp: Path) -> None:
    write_policy(tmp / "p" / "custom")
    _entry(tmp, "custom", "p/custom", version="v2.0.0")


NO_INIT = policy_code().replace("def __init__(self, params: Mapping[str, Any])", "def _x(self)")
SYNTAX = "class Policy(:\n"

CASES = {
    "folder-missing": Case(
        lambda t: _entry(t, "custom", "nowhere"),
        ["policies[0] (custom): uri: 'nowhere': {tmp}/nowhere does not exist"],
    ),
    "uri-is-a-file": Case(
        _uri_is_file,
        ["policies[0] (custom): uri: 'f': {tmp}/f is not a folder"],
    ),
    "definition-missing": Case(
        _definition_missing,
        ["policies[0] (custom): {tmp}/p/custom/v1.0.0/policy-definition.yaml: missing"],
    ),
    "build-missing": Case(
        lambda t: _one(t, build=None),
        ["policies[0] (custom): {tmp}/p/custom/v1.0.0/BUILD.bazel: missing"],
    ),
    "build-without-macro": Case(
        lambda t: _one(t, build='py_library(name = "policy")\n'),
        ["{tmp}/p/custom/v1.0.0/BUILD.bazel: must call policy_library()"],
    ),
    "code-missing": Case(
        lambda t: _one(t, code=""),
        ["policies[0] (custom): {tmp}/p/custom/v1.0.0/policy.py: missing"],
    ),
    "definition-schema": Case(
        lambda t: _one(t, definition={"phases": ["both"], "description": None}),
        [
            "policies[0] (custom): {tmp}/p/custom/v1.0.0/policy-definition.yaml: "
            "'description' is a required property",
            "policy-definition.yaml: phases[0]: 'both' is not one of",
        ],
    ),
    "name-mismatch": Case(
        lambda t: _one(t, name="other"),
        [
            "policies[0] (custom): {tmp}/p/custom/v1.0.0/policy-definition.yaml: name: "
            "'other' does not match the manifest's name 'custom'"
        ],
    ),
    "version-mismatch": Case(
        _version_mismatch,
        [
            "policies[0] (custom v2.0.0): {tmp}/p/custom/policy-definition.yaml: version: "
            "'v1.0.0' does not match the manifest's version 'v2.0.0'"
        ],
    ),
    "no-policy-class": Case(
        lambda t: _one(t, code="class Other:\n    pass\n"),
        ["{tmp}/p/custom/v1.0.0/policy.py: Policy: no top-level class named 'Policy'"],
    ),
    "missing-response-hook": Case(
        lambda t: _one(t, phases=["request", "response"]),
        [
            "{tmp}/p/custom/v1.0.0/policy.py: line 11: Policy.on_response: missing "
            "(the definition declares the response phase)"
        ],
    ),
    "missing-request-hook": Case(
        lambda t: _one(t, code=policy_code().replace("on_request", "on_other")),
        ["policy.py: line 11: Policy.on_request: missing (the definition declares the request"],
    ),
    "init-without-params": Case(
        lambda t: _one(t, code=policy_code().replace("self, params: Mapping[str, Any]", "self")),
        ["policy.py: line 12: Policy.__init__: __init__ must take the parameters mapping"],
    ),
    "init-missing": Case(
        lambda t: _one(t, code=NO_INIT),
        ["policy.py: line 11: Policy.__init__: missing (the engine calls Policy(params)"],
    ),
    "syntax-error": Case(
        lambda t: _one(t, code=SYNTAX),
        ["{tmp}/p/custom/v1.0.0/policy.py: line 1: syntax error"],
    ),
    "conflict": Case(
        _conflict,
        [
            "policies[1] (custom): conflict: policy 'custom' version v1.0.0 is provided "
            "twice: policies[0] (custom) uri 'a/custom' ({tmp}/a/custom) and policies[1] "
            "(custom) uri 'b/custom' ({tmp}/b/custom)"
        ],
    ),
}


@pytest.fixture
def fake_bazel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace whose "bazel" only records that it was started."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "MODULE.bazel").write_text("")
    marker = tmp_path / "bazel-was-run"
    script = tmp_path / "bazel"
    script.write_text(f'#!/bin/sh\necho "$@" >> {marker}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("POLICY_ENGINE_BAZEL", str(script))
    monkeypatch.setenv("BUILD_WORKSPACE_DIRECTORY", str(workspace))
    monkeypatch.setenv("BUILD_WORKING_DIRECTORY", str(tmp_path))
    return marker


def _expected(case: Case, tmp: Path) -> list[str]:
    return [line.format(tmp=tmp) for line in case.expected]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_failure_message(tmp_path: Path, case: Case) -> None:
    case.setup(tmp_path)
    manifest = load_manifest(tmp_path / "policy-manifest.yaml")
    with pytest.raises(ValidationError) as info:
        validate(manifest)
    errors = info.value.errors
    for line in errors:
        assert line.startswith(f"{manifest.path}: policies["), line
    for expected in _expected(case, tmp_path):
        assert any(expected in line for line in errors), (expected, errors)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_failure_produces_nothing(tmp_path: Path, fake_bazel: Path, case: Case) -> None:
    case.setup(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    status = build.main(["--manifest", "policy-manifest.yaml"], out=out, err=err)
    assert status == build.EXIT_INVALID
    assert "validation error(s); nothing was built" in err.getvalue()
    for expected in _expected(case, tmp_path):
        assert expected in err.getvalue()
    assert not (tmp_path / "ws" / "generated").exists()
    assert not fake_bazel.exists(), "Bazel must not run when validation fails"


def test_all_problems_of_all_entries_at_once(tmp_path: Path) -> None:
    write_policy(tmp_path / "a", name="a", code="class Policy:\n    pass\n", build=None)
    write_policy(tmp_path / "b", name="bee")
    write_manifest(
        tmp_path / "policy-manifest.yaml",
        [{"name": "a", "uri": "a"}, {"name": "b", "uri": "b"}, {"name": "c", "uri": "c"}],
    )
    with pytest.raises(ValidationError) as info:
        validate(load_manifest(tmp_path / "policy-manifest.yaml"))
    joined = "\n".join(info.value.errors)
    for expected in (
        "policies[0] (a): " + str(tmp_path / "a" / "BUILD.bazel") + ": missing",
        "Policy.__init__: missing",
        "Policy.on_request: missing",
        "policies[1] (b): ",
        "'bee' does not match the manifest's name 'b'",
        "policies[2] (c): uri: 'c'",
    ):
        assert expected in joined
    assert len(info.value.errors) == 5, joined


def test_valid_policies_pass_in_manifest_order(tmp_path: Path) -> None:
    write_policy(tmp_path / "b", name="b", phases=["request"])
    write_policy(tmp_path / "a", name="a", version="v2.0.0")
    write_manifest(
        tmp_path / "policy-manifest.yaml",
        [{"name": "b", "uri": "b"}, {"name": "a", "version": "v2.0.0", "uri": "a"}],
    )
    policies = validate(load_manifest(tmp_path / "policy-manifest.yaml"))
    assert [p.key for p in policies] == [("b", "v1.0.0"), ("a", "v2.0.0")]


@pytest.mark.parametrize(
    ("signature", "problem"),
    [
        ("self, params", None),
        ("self, params, *, clock=None", None),
        ("self, *args", None),
        ("self, params, extra", "__init__ arguments after params need defaults: extra"),
        ("self, params, *, clock", "keyword-only arguments need defaults: clock"),
    ],
    ids=["plain", "kw-default", "varargs", "extra-positional", "kw-required"],
)
def test_init_signatures(tmp_path: Path, signature: str, problem: str | None) -> None:
    code = tmp_path / "policy.py"
    code.write_text(
        f"class Policy:\n    def __init__({signature}):\n        pass\n"
        "    async def on_request(self, ctx):\n        return None\n"
    )
    problems = check_policy_code(code, ["request"])
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problem in problems[0]


def test_async_hooks_accepted(tmp_path: Path) -> None:
    code = tmp_path / "policy.py"
    code.write_text(
        "class Policy:\n    def __init__(self, params):\n        pass\n"
        "    async def on_request(self, ctx):\n        return None\n"
        "    async def on_response(self, ctx):\n        return None\n"
    )
    assert check_policy_code(code, ["request", "response"]) == []


def test_fake_bazel_would_notice(tmp_path: Path, fake_bazel: Path) -> None:
    """The "nothing produced" checks can fail: a valid manifest does reach Bazel."""
    write_policy(tmp_path / "p", name="custom")
    write_manifest(tmp_path / "policy-manifest.yaml", [{"name": "custom", "uri": "p"}])
    status = build.main(
        ["--manifest", "policy-manifest.yaml"], out=io.StringIO(), err=io.StringIO()
    )
    assert status == 0
    assert (
        fake_bazel.read_text().splitlines()[0].startswith("test --test_output=errors //generated/")
    )
    assert any((tmp_path / "ws" / "generated").iterdir())
    assert os.environ["POLICY_ENGINE_BAZEL"] == str(tmp_path / "bazel")


def test_push_to_a_digest_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build.main(["--push", "127.0.0.1:5000/engine@sha256:" + "0" * 64])
    assert exited.value.code == 2
    assert "--push takes REGISTRY/REPO[:TAG], not a digest" in capsys.readouterr().err
