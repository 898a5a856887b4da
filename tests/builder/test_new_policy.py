"""builder.new_policy: the scaffold writes a policy folder that is valid and passes its
own test as written; it refuses bad names and never overwrites a folder."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.manifest import load_manifest
from builder.new_policy import VERSION, files, main, policy_test_path
from builder.testing import write_manifest
from builder.validate import validate


def scaffold(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def written(tmp_path: Path) -> Path:
    code, out, err = scaffold(tmp_path, "--name", "myGreeting", "--dir", str(tmp_path / "p"))
    assert (code, err) == (0, "")
    folder = tmp_path / "p" / "myGreeting" / VERSION
    assert f"new_policy: wrote {folder}/" in out
    return folder


def test_writes_the_folder(written: Path) -> None:
    assert sorted(str(p.relative_to(written)) for p in written.rglob("*") if p.is_file()) == [
        "BUILD.bazel",
        "policy-definition.yaml",
        "policy.py",
        "tests/test_myGreeting_v1_0_0.py",
    ]
    assert [p.name for p in written.parent.iterdir()] == [VERSION], "no staging folder left"
    assert (written / "BUILD.bazel").read_text().count("policy_library(") == 1


def test_builder_validation_accepts_it(written: Path, tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "policy-manifest.yaml", [{"name": "myGreeting", "uri": str(written)}]
    )
    (policy,) = validate(load_manifest(manifest))
    assert policy.key == ("myGreeting", VERSION)


def test_its_test_passes_with_plain_pytest(written: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(written / "tests")],
        cwd=written,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("MyPolicy", id="upper-case-start"),
        pytest.param("my-policy", id="dash"),
        pytest.param("my_policy", id="underscore"),
        pytest.param("1policy", id="digit-start"),
        pytest.param("", id="empty"),
        pytest.param("../escape", id="path"),
    ],
)
def test_refuses_an_invalid_name(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        scaffold(tmp_path, "--name", name, "--dir", str(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--name: {name!r} is not a valid policy name" in err
    assert "^[a-z][A-Za-z0-9]*$" in err
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(written: Path, tmp_path: Path) -> None:
    (written / "policy.py").write_text("# mine\n")
    code, out, err = scaffold(tmp_path, "--name", "myGreeting", "--dir", str(tmp_path / "p"))
    assert code == 2
    assert out == ""
    assert err == (
        f"new_policy: --dir: {written} already exists; nothing was written "
        "(choose another --name or --dir)\n"
    )
    assert (written / "policy.py").read_text() == "# mine\n"


def test_a_dir_that_cannot_hold_folders_is_an_error(tmp_path: Path) -> None:
    """Before: --dir naming a file (or a place that cannot be written) ended in a
    NotADirectoryError traceback from mkdir."""
    (tmp_path / "file").write_text("")
    code, out, err = scaffold(tmp_path, "--name", "greeting", "--dir", str(tmp_path / "file"))
    assert code == 2
    assert out == ""
    assert err.startswith(
        f"new_policy: --dir: cannot create {tmp_path / 'file' / 'greeting'}: Not a directory"
    ), err
    assert "nothing was written" in err
    assert (tmp_path / "file").read_text() == ""


def test_relative_dir_is_from_where_bazel_run_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUILD_WORKING_DIRECTORY", str(tmp_path))
    code, _, _ = scaffold(tmp_path, "--name", "other", "--dir", "sub")
    assert code == 0
    assert (tmp_path / "sub" / "other" / VERSION / policy_test_path("other")).is_file()


def test_default_header_follows_the_name() -> None:
    assert "default: x-my-greeting" in files("myGreeting")["policy-definition.yaml"]
