"""Each compiled policy's own tests, run by the builder before it builds anything.

``policy_library`` defines one pytest target per ``tests/test_<module>.py``, named
``<module>_test`` (``tools/pytest/defs.bzl``), in the package of the policy's label
(in place for in-repo folders, the generated copy otherwise). The builder ``bazel test``s
those targets together with the generated ``validation_test`` (every definition's
examples) before ``bazel build`` of the engine and image, so a failing test leaves no
engine and no image.

When ``bazel test`` reports failed tests, :func:`failure_report` reads each target's
JUnit XML (``bazel-testlogs/<package>/<target>/test.xml``, which ``tools/pytest/main.py``
asks pytest to write) and names, per failure, the manifest entry, the policy folder, the
test file and the test: ``<manifest>: policies[i] (<name> <version>): <folder>:
tests/test_x.py::test_y: failed: <first line of the message>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from builder.validate import ValidatedPolicy

__all__ = ["PolicyTests", "failure_report", "fresh_failures", "policy_tests"]

_TESTS_DIR: Final = "tests"


@dataclass(frozen=True, slots=True)
class PolicyTests:
    """The test targets of one manifest entry (``files[i]`` is tested by ``targets[i]``)."""

    policy: ValidatedPolicy
    package: str
    files: tuple[str, ...]
    targets: tuple[str, ...]


def _package(label: str) -> str:
    return label.removeprefix("//").partition(":")[0]


def policy_tests(policies: Sequence[ValidatedPolicy], labels: Sequence[str]) -> list[PolicyTests]:
    """The pytest targets of every policy, ``labels[i]`` being ``policies[i]``'s library."""
    found = []
    for policy, label in zip(policies, labels, strict=True):
        package = _package(label)
        files = sorted(
            p.relative_to(policy.folder).as_posix()
            for p in (policy.folder / _TESTS_DIR).glob("test_*.py")
            if p.is_file()
        )
        targets = tuple(f"//{package}:{Path(f).stem.removeprefix('test_')}_test" for f in files)
        found.append(PolicyTests(policy, package, tuple(files), targets))
    return found


def _failures(xml_file: Path) -> list[str]:
    """``test_name: failed: message`` for each failed or erroring case of a JUnit file."""
    try:
        root = ET.parse(xml_file).getroot()
    except (OSError, ET.ParseError):
        return []
    lines: list[str] = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            problem = case.find(kind)
            if problem is None:
                continue
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            first = message[0] if message else ""
            if first == "collection failure":  # pytest's fixed text: the cause is the last E line
                text = (problem.text or "").splitlines()
                causes = [line[1:].strip() for line in text if line.startswith("E ")]
                if causes:
                    first += f": {causes[-1]}"
            verb = "failed" if kind == "failure" else "error"
            lines.append(f"{case.get('name', '?')}: {verb}" + (f": {first}" if first else ""))
    return lines


def failure_report(
    manifest: Path, suites: Sequence[PolicyTests], testlogs: Path, since: float
) -> list[str]:
    """One line per failed policy test, found in ``testlogs`` (``bazel-testlogs``).

    Only logs written after ``since`` (a ``time.time()``) count: an older ``test.xml`` is
    a cached pass or a stale failure. A target that failed without a readable report
    (it crashed, timed out) is named as a whole.
    """
    lines: list[str] = []
    for suite in suites:
        where = f"{manifest}: {suite.policy.entry.label}: {suite.policy.folder}"
        for file, target in zip(suite.files, suite.targets, strict=True):
            failures = fresh_failures(testlogs / suite.package / target.rpartition(":")[2], since)
            lines.extend(f"{where}: {file}::{failure}" for failure in failures)
    return lines


def fresh_failures(log_dir: Path, since: float) -> list[str]:
    """The failures a test target's ``log_dir`` reports, if it ran after ``since``.

    A target not run by this build (cached: it passed) reports none. One that failed
    without a readable report (crashed, timed out) is named as a whole.
    """
    log, xml_file = log_dir / "test.log", log_dir / "test.xml"
    if not log.exists() or log.stat().st_mtime < since:
        return []
    if not xml_file.exists():
        return [f"failed without a report (see {log})"]
    return _failures(xml_file)
