"""builder.policy_tests and the builder's test step, with a fake Bazel.

The fake records its command lines; for `bazel test` it writes a failing JUnit report
for every policy test target it is given (as `tools/pytest/main.py` makes pytest do)
and exits 3, Bazel's "build passed, tests failed". The real thing (a policy with a
failing test builds nothing) is in test_build_e2e.py.
"""

from __future__ import annotations

import io
import stat
import sys
import time
from pathlib import Path

import pytest

from builder import build
from builder.manifest import load_manifest
from builder.policy_tests import PolicyTests, failure_report, policy_tests
from builder.testing import write_manifest, write_policy
from builder.validate import validate

_FAKE = """#!{python}
import pathlib, sys
args = sys.argv[1:]
with open({marker!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if args[0] == "test" and {fail!r}:
    for label in args[1:]:
        if label.startswith("//") and not label.endswith(":validation_test"):
            package, _, name = label[2:].partition(":")
            logs = pathlib.Path({testlogs!r}) / package / name
            logs.mkdir(parents=True, exist_ok=True)
            (logs / "test.log").write_text("FAILED")
            (logs / "test.xml").write_text(
                '<testsuites><testsuite><testcase classname="tests.t" name="test_ok"/>'
                '<testcase classname="tests.t" name="test_header[x]">'
                '<failure message="assert \\'a\\' == \\'b\\'&#10;more">trace</failure>'
                "</testcase></testsuite></testsuites>"
            )
    sys.exit(3)
"""

FAILING_TEST = "def test_header() -> None:\n    assert 'a' == 'b'\n"


def _fake_bazel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, fail: bool) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "MODULE.bazel").write_text("")
    marker = tmp_path / "bazel-was-run"
    script = tmp_path / "bazel"
    script.write_text(
        _FAKE.format(
            python=sys.executable,
            marker=str(marker),
            fail=fail,
            testlogs=str(workspace / "bazel-testlogs"),
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("POLICY_ENGINE_BAZEL", str(script))
    monkeypatch.setenv("BUILD_WORKSPACE_DIRECTORY", str(workspace))
    monkeypatch.setenv("BUILD_WORKING_DIRECTORY", str(tmp_path))
    return marker


def _custom(tmp_path: Path) -> Path:
    write_policy(
        tmp_path / "p",
        name="custom",
        extra_files={"tests/test_custom.py": FAILING_TEST, "tests/helpers.py": ""},
    )
    return write_manifest(tmp_path / "policy-manifest.yaml", [{"name": "custom", "uri": "p"}])


def test_targets_one_per_test_module(tmp_path: Path) -> None:
    write_policy(
        tmp_path / "p",
        extra_files={"tests/test_a.py": "", "tests/test_b_c.py": "", "tests/helpers.py": ""},
    )
    write_policy(tmp_path / "q", name="other")
    manifest = write_manifest(
        tmp_path / "m.yaml", [{"name": "custom", "uri": "p"}, {"name": "other", "uri": "q"}]
    )
    policies = validate(load_manifest(manifest))
    suites = policy_tests(policies, ["//x/p:policy", "//generated/m/policies/other/v1.0.0:policy"])
    assert [s.targets for s in suites] == [("//x/p:a_test", "//x/p:b_c_test"), ()]
    assert suites[0].files == ("tests/test_a.py", "tests/test_b_c.py")


def _logged(tmp_path: Path, report: str) -> tuple[Path, list[PolicyTests], Path]:
    """The custom policy's manifest and suites, and its test's log folder as Bazel leaves
    it: an empty test.log and ``report`` as test.xml."""
    manifest = _custom(tmp_path)
    suites = policy_tests(validate(load_manifest(manifest)), ["//pkg:policy"])
    logs = tmp_path / "testlogs" / "pkg" / "custom_test"
    logs.mkdir(parents=True)
    (logs / "test.log").write_text("")
    (logs / "test.xml").write_text(report)
    return manifest, suites, logs


def test_report_names_entry_folder_file_and_test(tmp_path: Path) -> None:
    manifest, suites, logs = _logged(
        tmp_path,
        '<testsuite><testcase name="test_header"><failure message="assert 1 == 2">x'
        '</failure></testcase><testcase name="test_fine"/></testsuite>',
    )
    since = time.time() - 5
    assert failure_report(manifest, suites, tmp_path / "testlogs", since) == [
        f"{manifest}: policies[0] (custom): {tmp_path}/p: "
        "tests/test_custom.py::test_header: failed: assert 1 == 2"
    ]
    # A log from before this build is a cached pass, not a failure of this build.
    assert failure_report(manifest, suites, tmp_path / "testlogs", time.time() + 5) == []
    (logs / "test.xml").unlink()
    assert failure_report(manifest, suites, tmp_path / "testlogs", since) == [
        f"{manifest}: policies[0] (custom): {tmp_path}/p: tests/test_custom.py::"
        f"failed without a report (see {logs / 'test.log'})"
    ]


def test_a_collection_error_is_reported_with_its_cause(tmp_path: Path) -> None:
    """Before: a policy whose code raises at import was reported as
    ``<module>: error: collection failure``, pytest's fixed message, and the cause was
    only somewhere in Bazel's output above."""
    manifest, suites, _ = _logged(
        tmp_path,
        '<testsuite><testcase classname="" name="tests.test_custom">'
        '<error message="collection failure">p/policy.py:12: in &lt;module&gt;\n'
        '    raise RuntimeError("boom")\nE   RuntimeError: boom\n\nThe above exception'
        " was the direct cause of the following exception:\n"
        "engine/registry.py:234: in _import_policy_module\n"
        "E   engine.errors.RegistryError: p/policy.py: import failed: RuntimeError: boom\n"
        "</error></testcase></testsuite>",
    )
    assert failure_report(manifest, suites, tmp_path / "testlogs", time.time() - 5) == [
        f"{manifest}: policies[0] (custom): {tmp_path}/p: tests/test_custom.py::"
        "tests.test_custom: error: collection failure: engine.errors.RegistryError: "
        "p/policy.py: import failed: RuntimeError: boom"
    ]


def test_failing_policy_test_builds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = _fake_bazel(tmp_path, monkeypatch, fail=True)
    manifest = _custom(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    status = build.main(["--manifest", str(manifest)], out=out, err=err)
    assert status == build.EXIT_INVALID, err.getvalue()
    commands = marker.read_text().splitlines()
    assert len(commands) == 1, commands
    assert commands[0].startswith("test "), commands
    assert "//generated/" in commands[0]
    assert ":custom_test" in commands[0]
    assert ":validation_test" in commands[0]
    assert "1 policy test failure(s); nothing was built:" in err.getvalue()
    assert (
        f"  {manifest}: policies[0] (custom): {tmp_path}/p: "
        "tests/test_custom.py::test_header[x]: failed: assert 'a' == 'b'\n"
    ) in err.getvalue()


@pytest.mark.parametrize("flag", ["--skip-policy-tests", "--no-test"])
def test_skip_policy_tests_builds_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    marker = _fake_bazel(tmp_path, monkeypatch, fail=True)
    manifest = _custom(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    status = build.main(["--manifest", str(manifest), flag], out=out, err=err)
    assert status == 0, err.getvalue()
    commands = marker.read_text().splitlines()
    assert [c.split()[0] for c in commands] == ["build"], commands
    assert err.getvalue().count("WARNING: --skip-policy-tests") == 2  # before and at the end
    assert "This engine is untested." in err.getvalue()
