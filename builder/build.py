"""``bazel run //builder:build -- --manifest PATH [--push REGISTRY/REPO:TAG]``.

Steps, each printed as it runs:

1. read the manifest (``--manifest``, resolved against the directory ``bazel run``
   was started from; default ``manifests/policy-manifest.yaml``);
2. validate every policy (:mod:`builder.validate`); on any problem print the whole
   report and exit 1 before anything is generated or built;
3. write the manifest's Bazel package (:mod:`builder.generate`);
4. ``bazel test`` every policy's own tests (``tests/test_*.py``, one target each) and
   the generated validation test (the definitions' examples); a failure is reported
   like a validation error (manifest entry, policy folder, test) and exit 1, nothing
   built (:mod:`builder.policy_tests`). ``--skip-policy-tests`` skips this step, loudly;
5. ``bazel build`` the engine (and its image when the image rules exist); with
   ``--push``, run ``image_push``.

Bazel is the command in ``$POLICY_ENGINE_BAZEL`` (split like a shell word list)
if set, else ``bazel`` from ``PATH``; it runs in the workspace. Inside
``bazel run`` the outer Bazel has released its lock, so this nested call works.

Exit codes: 0 built, 1 invalid manifest or policies or a failing policy test,
2 bad command line, 3 Bazel failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

from builder.errors import BazelError, ManifestError, ValidationError
from builder.generate import ENGINE_TARGET, VALIDATION_TEST_TARGET, GeneratedPackage, generate
from builder.manifest import load_manifest
from builder.policy_tests import failure_report, fresh_failures, policy_tests
from builder.validate import validate

__all__ = [
    "DEFAULT_MANIFEST",
    "build_parser",
    "find_workspace",
    "main",
    "run_bazel",
    "split_reference",
]

DEFAULT_MANIFEST: Final = "manifests/policy-manifest.yaml"
EXIT_INVALID: Final = 1
EXIT_BAZEL: Final = 3
BAZEL_TESTS_FAILED: Final = 3  # `bazel test`: the build passed, some tests failed
SKIP_WARNING: Final = """\
builder: ################################################################
builder: WARNING: --skip-policy-tests: the policies' own tests and their
builder: definitions' examples were NOT run. This engine is untested.
builder: Use it for emergencies only; rebuild without the flag after.
builder: ################################################################"""


def find_workspace(start: Path) -> Path:
    """``$BUILD_WORKSPACE_DIRECTORY`` (set by ``bazel run``), else the nearest parent of
    ``start`` holding ``MODULE.bazel``."""
    env = os.environ.get("BUILD_WORKSPACE_DIRECTORY")
    if env:
        return Path(env)
    for folder in (start, *start.parents):
        if (folder / "MODULE.bazel").is_file():
            return folder
    raise SystemExit(f"builder: no Bazel workspace (MODULE.bazel) above {start}")


def bazel_command() -> list[str]:
    return shlex.split(os.environ.get("POLICY_ENGINE_BAZEL") or "bazel")


def run_bazel(args: Sequence[str], workspace: Path, out: TextIO, *, tests_failed: int = 0) -> int:
    """Run one Bazel command in ``workspace``; :class:`BazelError` if it fails.

    ``tests_failed``: an exit code returned (not raised) because the caller handles it
    (``bazel test`` exits 3 when the build passed but tests failed).
    """
    command = [*bazel_command(), *args]
    print(f"builder: $ {shlex.join(command)}", file=out, flush=True)
    # Bazel must not see the outer `bazel run`'s runfiles variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNFILES_", "PYTHON"))}
    status = subprocess.run(command, cwd=workspace, env=env, check=False).returncode
    if tests_failed and status == tests_failed:
        return status
    if status != 0:
        raise BazelError(f"`{shlex.join(command)}` failed with exit code {status}")
    return status


def split_reference(reference: str) -> tuple[str, str | None]:
    """``registry:5000/repo:tag`` -> (``registry:5000/repo``, ``tag``); no tag -> None."""
    name, colon, tag = reference.rpartition(":")
    if colon and "/" not in tag:
        return name, tag
    return reference, None


def _image_available(workspace: Path) -> bool:
    return (workspace / "builder" / "private" / "image.bzl").is_file()


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (also the source of docs/reference/cli.md)."""
    parser = argparse.ArgumentParser(
        prog="bazel run //builder:build --",
        description="Validate a policy manifest and build a policy engine from it.",
    )
    parser.add_argument(
        "--manifest",
        default=None,
        metavar="PATH",
        help=f"policy manifest (default: <workspace>/{DEFAULT_MANIFEST})",
    )
    parser.add_argument(
        "--push", metavar="REGISTRY/REPO:TAG", help="push the engine image there after building"
    )
    parser.add_argument(
        "--release",
        action="store_true",
        help="stamp the build (--config=release: build time, source revision)",
    )
    parser.add_argument(
        "--validate-only", action="store_true", help="validate the manifest and exit"
    )
    parser.add_argument(
        "--skip-policy-tests",
        action="store_true",
        help="EMERGENCIES ONLY: build without running the policies' tests and examples",
    )
    parser.add_argument(
        "--no-test",
        dest="skip_policy_tests",
        action="store_true",
        help="old name of --skip-policy-tests",
    )
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; exits 2 with a usage message on errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.push and "@" in args.push.rsplit("/", 1)[-1]:
        parser.error(f"--push takes REGISTRY/REPO[:TAG], not a digest: {args.push}")
    return args


def _outputs(package: GeneratedPackage, image: bool) -> list[str]:
    bin_dir = package.workspace / "bazel-bin" / package.package
    lines = [
        f"engine binary:   {bin_dir / ENGINE_TARGET}",
        f"registry module: {bin_dir / (ENGINE_TARGET + '_registry.py')}",
        f"build metadata:  {bin_dir / (ENGINE_TARGET + '_build_info.json')}",
        f"config schema:   {bin_dir / (ENGINE_TARGET + '_config.schema.json')}",
        f"run it:          bazel run {package.target(ENGINE_TARGET)} -- --config FILE",
    ]
    if image:
        lines.append(f"image:           bazel run {package.target('image_load')}")
    return lines


def main(argv: Sequence[str], *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the builder; return its exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = _parse(argv)
    started = time.monotonic()
    cwd = Path(os.environ.get("BUILD_WORKING_DIRECTORY") or os.getcwd())
    workspace = find_workspace(cwd)
    manifest_path = Path(args.manifest) if args.manifest else workspace / DEFAULT_MANIFEST
    if not manifest_path.is_absolute():
        manifest_path = cwd / manifest_path

    print(f"builder: manifest {manifest_path}", file=out, flush=True)
    try:
        manifest = load_manifest(manifest_path)
        policies = validate(manifest)
    except (ManifestError, ValidationError) as exc:
        print(f"builder: {len(exc.errors)} validation error(s); nothing was built:", file=err)
        for line in exc.errors:
            print(f"  {line}", file=err)
        return EXIT_INVALID
    for policy in policies:
        name, version = policy.key
        print(f"builder: ok {name} {version} ({policy.folder})", file=out)
    if args.validate_only:
        print(f"builder: {len(policies)} policies valid", file=out)
        return 0

    package = generate(manifest, policies, workspace)
    print(f"builder: generated //{package.package}", file=out, flush=True)

    image = _image_available(workspace)
    flags = ["--config=release"] if args.release else []
    targets = [package.target(ENGINE_TARGET)]
    if image:
        targets.append(package.target("image"))
    try:
        if args.skip_policy_tests:
            print(SKIP_WARNING, file=err, flush=True)
        else:
            suites = policy_tests(policies, package.labels)
            tests = [package.target(VALIDATION_TEST_TARGET)]
            tests += [target for suite in suites for target in suite.targets]
            print(f"builder: testing {len(policies)} policies ({len(tests)} targets)", file=out)
            since = time.time() - 1  # file times may be coarser than time.time()
            status = run_bazel(
                ["test", *flags, "--test_output=errors", *tests],
                workspace,
                out,
                tests_failed=BAZEL_TESTS_FAILED,
            )
            if status == BAZEL_TESTS_FAILED:
                testlogs = workspace / "bazel-testlogs"
                lines = failure_report(manifest.path, suites, testlogs, since)
                validation = testlogs / package.package / VALIDATION_TEST_TARGET
                lines += [
                    f"{manifest.path}: {package.target(VALIDATION_TEST_TARGET)} (definition "
                    f"examples, policies loading): {failure}"
                    for failure in fresh_failures(validation, since)
                ]
                print(f"builder: {len(lines)} policy test failure(s); nothing was built:", file=err)
                for line in lines or ["(see the Bazel output above)"]:
                    print(f"  {line}", file=err)
                return EXIT_INVALID
        run_bazel(["build", *flags, *targets], workspace, out)
        if args.push:
            if not image:
                raise BazelError("--push needs the image rules (builder/private/image.bzl)")
            repository, tag = split_reference(args.push)
            push = ["--repository", repository, *(["--tag", tag] if tag else [])]
            run_bazel(["run", *flags, package.target("image_push"), "--", *push], workspace, out)
    except BazelError as exc:
        print(f"builder: {exc}", file=err)
        return EXIT_BAZEL
    print(f"builder: done in {time.monotonic() - started:.1f} s", file=out)
    if args.skip_policy_tests:
        print(SKIP_WARNING, file=err, flush=True)
    for line in _outputs(package, image):
        print(f"  {line}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
