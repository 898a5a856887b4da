"""Tests of the repository's launchers: tools/bazel and .ci/run.

Both are shell scripts; these tests run copies of them against fake programs,
so nothing here provisions a root or runs a real Bazel.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _run(
    cmd: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _system_tools_without_bazel(tmp_path: Path) -> Path:
    """/usr/bin as links, minus any real Bazel (under `bazel test` one is on PATH)."""
    tools = tmp_path / "system-bin"
    tools.mkdir()
    for program in Path("/usr/bin").iterdir():
        if not program.name.startswith("bazel"):
            (tools / program.name).symlink_to(program)
    return tools


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"BAZEL_REAL", "CI"}}
    # A cache folder of its own: a mistake here must never touch the real root.
    env["POLICY_ENGINE_CACHE"] = str(tmp_path / "cache")
    return env


def test_bazel_real_is_used_as_is(tmp_path: Path, base_env: dict[str, str]) -> None:
    fake = _script(tmp_path / "real-bazel", 'echo "real bazel: $*"; exit 7\n')
    result = _run(
        [str(REPO / "tools/bazel"), "version", "--gnu_format"],
        {**base_env, "BAZEL_REAL": str(fake)},
    )
    assert result.stdout == "real bazel: version --gnu_format\n"
    assert result.returncode == 7  # the exit code passes straight through
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("version", "used"),
    [("bazel 7.4.1", True), ("bazel 8.0.0", True), ("bazel 6.5.0", False)],
    ids=["bazel7", "bazel8", "bazel6-too-old"],
)
def test_bazel_on_path_is_used_when_new_enough(
    tmp_path: Path, base_env: dict[str, str], version: str, used: bool
) -> None:
    bindir = tmp_path / "bin"
    _script(
        bindir / "bazel",
        f'if [[ "$1" == --version ]]; then echo "{version}"; exit 0; fi\necho "path bazel: $*"\n',
    )
    # Too old a Bazel means provisioning a root: forbid it, so the launcher stops
    # with its own error instead of debootstrapping.
    env = {**base_env, "PATH": f"{bindir}:{_system_tools_without_bazel(tmp_path)}"}
    env["POLICY_ENGINE_NO_PROVISION"] = "1"
    result = _run([str(REPO / "tools/bazel"), "info"], env)
    if used:
        assert result.stdout == "path bazel: info\n"
        assert result.returncode == 0
    else:
        assert "path bazel" not in result.stdout
        assert result.returncode == 75
        assert "POLICY_ENGINE_NO_PROVISION forbids provisioning" in result.stderr


@pytest.fixture
def ci_copy(tmp_path: Path) -> Path:
    """Copies of .ci/run and tools/test beside a fake tools/bazel whose exit code we choose."""
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci/run", root / ".ci/run")
    (root / "tools").mkdir()
    shutil.copy(REPO / "tools/test", root / "tools/test")
    _script(root / "tools/bazel", 'echo "bazel $*"; exit "${FAKE_BAZEL_EXIT:-0}"\n')
    # tools/test's steps outside Bazel: the podman image test (which drives tools/bazel
    # itself) and, last, the gateway examples' schema check.
    _script(root / "tests/image/podman_e2e.sh", 'echo "podman_e2e $*"\n')
    _script(root / "deploy/gateways/schema-check/run.sh", 'echo "schema_check $*"\n')
    return root


@pytest.mark.parametrize("code", [0, 1, 3], ids=["pass", "build-failure", "test-failure"])
def test_ci_run_reports_bazel_verdict_without_fallback(
    ci_copy: Path, base_env: dict[str, str], code: int
) -> None:
    result = _run(["bash", ".ci/run"], {**base_env, "FAKE_BAZEL_EXIT": str(code)}, cwd=ci_copy)
    assert result.stdout.startswith("bazel test //...\n")
    assert result.returncode == code
    # The tests that drive Bazel run only after `bazel test` passed.
    assert ("bazel run //tools/demo -- --check" in result.stdout) == (code == 0)
    assert ("podman_e2e" in result.stdout) == (code == 0)
    assert ("schema_check" in result.stdout) == (code == 0)
    assert "FALLBACK" not in result.stderr


def test_ci_run_falls_back_loudly_only_when_provisioning_failed(
    ci_copy: Path, base_env: dict[str, str], tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    # The fallback's first step is a venv from python3.11: make it fail fast.
    _script(bindir / "python3.11", 'echo "python3.11 $*"; exit 42\n')
    env = {**base_env, "FAKE_BAZEL_EXIT": "75", "PATH": f"{bindir}:/usr/bin:/bin"}
    result = _run(["bash", ".ci/run"], env, cwd=ci_copy)
    assert "CI FALLBACK" in result.stderr
    assert "python3.11 -m venv" in result.stdout
    assert result.returncode == 42
