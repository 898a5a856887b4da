"""``bazel run //builder:new_policy -- --name NAME --dir DIR``: a new policy folder.

Writes ``DIR/NAME/v1.0.0/`` holding a small working request policy that builds and
passes its test as written, to edit from there:

* ``policy-definition.yaml``: ``phases: [request]``, two parameters (``header``, with a
  default, and ``value``, required) and examples, one valid and one invalid;
* ``policy.py``: ``class Policy`` setting ``header: value`` on every request (the
  contract is ``engine/policy.py``);
* ``tests/test_NAME_v1_0_0.py``: the examples and the hook, through ``engine.testing``
  (no Envoy), with plain pytest or the folder's Bazel test targets;
* ``BUILD.bazel``: the one ``policy_library()`` call.

``NAME`` must satisfy the definition meta-schema's ``name`` rule
(``engine/definition_schema.json``, read here, not copied). ``DIR`` is resolved against
the directory ``bazel run`` was started from (``$BUILD_WORKING_DIRECTORY``), like the
builder's ``--manifest``. An existing ``DIR/NAME/v1.0.0`` is never touched. The folder
is written under a temporary name and renamed into place, so a failure leaves nothing
half-written.

Exit codes: 0 written, 2 bad command line (invalid ``--name``, existing folder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Final, TextIO

from engine.cli import run_cli
from engine.definition import DEFINITION_FILE, load_definition

__all__ = [
    "BUILD_FILE",
    "NAME_PATTERN",
    "VERSION",
    "build_parser",
    "files",
    "main",
    "name_problem",
    "policy_test_path",
]

VERSION: Final = "v1.0.0"
BUILD_FILE: Final = 'load("//builder:defs.bzl", "policy_library")\n\npolicy_library()\n'


def _name_pattern() -> str:
    schema = json.loads(
        resources.files("engine").joinpath("definition_schema.json").read_text("utf-8")
    )
    return str(schema["properties"]["name"]["pattern"])


NAME_PATTERN: Final = _name_pattern()
"""The meta-schema's rule for a policy name (``^[a-z][A-Za-z0-9]*$``)."""


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a policy name, or ``None`` when it can."""
    if re.search(NAME_PATTERN, name) is None:
        return (
            f"{name!r} is not a valid policy name: the definition meta-schema requires "
            f"{NAME_PATTERN} (a lower-case letter, then letters and digits, e.g. myPolicy)"
        )
    return None


def policy_test_path(name: str) -> str:
    """The test module's path in the folder; named after the policy and version so that
    plain pytest can collect several policies' tests in one run."""
    return f"tests/test_{name}_{VERSION.replace('.', '_')}.py"


def _header(name: str) -> str:
    """``myPolicy`` -> ``x-my-policy``: the default header the new policy sets."""
    return "x-" + re.sub(r"(?<!^)([A-Z])", r"-\1", name).lower()


def _definition(name: str) -> str:
    header = _header(name)
    return f"""\
name: {name}
version: {VERSION}
description: >-
  Sets one request header (header: value) on every request. Written by
  `bazel run //builder:new_policy`: say here what {name} does.
phases: [request]
parameters:
  header:
    type: string
    description: Name of the request header to set (lower-case).
    pattern: "^[a-z0-9-]+$"
    default: {header}
  value:
    type: string
    required: true
    description: The header's value.
    minLength: 1
examples:
  - description: sets {header}
    parameters: {{value: hello}}
    valid: true
  - description: value is required
    parameters: {{}}
    valid: false
    error: "missing required parameter(s): value"
"""


def _code(name: str) -> str:
    return f'''\
"""{name} {VERSION}: sets one request header (a starting point to edit).

The contract, with everything a policy may return, is ``engine/policy.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import RequestContext, RequestModifications

__all__ = ["Policy"]


class Policy:
    """Sets ``header: value`` on every request; records the header in the metadata."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        # Called once per chain entry when the configuration loads, with the parameters
        # validated against policy-definition.yaml and its defaults filled in. Raise
        # engine.policy.ParameterError for a problem the schema cannot express.
        self._header = str(params["header"])
        self._value = str(params["value"])

    def on_request(self, ctx: RequestContext) -> RequestModifications | None:
        # A plain (not async) hook runs inline: quick, no I/O. Per-request state goes
        # into ctx.metadata (shared with later policies and CEL conditions), never self.
        ctx.metadata["{name}.header"] = self._header
        return RequestModifications(set_headers={{self._header: self._value}})
'''


def _test(name: str) -> str:
    header = _header(name)
    return f'''\
"""Tests of {name} {VERSION}: its definition's examples and its hook, without Envoy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.policy import RequestModifications
from engine.registry import load_policy
from engine.testing import construct, example_id, make_request_context, valid_examples

POLICY = load_policy(Path(__file__).resolve().parents[1])


def test_definition_examples_behave_as_declared() -> None:
    assert POLICY.check_examples() == []


@pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
def test_valid_examples_construct(example: Mapping[str, Any]) -> None:
    construct(POLICY, example["parameters"])


def test_sets_the_header_and_records_it() -> None:
    policy = construct(POLICY, {{"value": "hello"}})
    ctx = make_request_context(path="/api/orders", headers={{"{header}": "from-client"}})
    assert policy.on_request(ctx) == RequestModifications(set_headers={{"{header}": "hello"}})
    assert ctx.metadata["{name}.header"] == "{header}"


def test_header_is_a_parameter() -> None:
    policy = construct(POLICY, {{"header": "x-other", "value": "1"}})
    action = policy.on_request(make_request_context())
    assert action == RequestModifications(set_headers={{"x-other": "1"}})
'''


def files(name: str) -> dict[str, str]:
    """Relative path -> content of the policy folder for ``name``."""
    return {
        DEFINITION_FILE: _definition(name),
        "policy.py": _code(name),
        policy_test_path(name): _test(name),
        "BUILD.bazel": BUILD_FILE,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (also the source of docs/reference/cli.md)."""
    parser = argparse.ArgumentParser(
        prog="bazel run //builder:new_policy --",
        description=f"Write a new policy folder DIR/NAME/{VERSION}/ that builds and passes "
        "its test as written.",
    )
    parser.add_argument(
        "--name", required=True, help="the policy's name, e.g. myPolicy (the definition's name)"
    )
    parser.add_argument(
        "--dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="where the policy's folder goes (DIR/NAME/VERSION/), e.g. /tmp/my-policies",
    )
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; exits 2 with a usage message on errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = name_problem(args.name)
    if problem:
        parser.error(f"--name: {problem}")
    return args


def main(argv: Sequence[str], *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Write the folder; return the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = _parse(argv)
    cwd = Path(os.environ.get("BUILD_WORKING_DIRECTORY") or os.getcwd())
    parent = (cwd / args.dir / args.name).absolute()
    folder = parent / VERSION
    if folder.exists():
        print(
            f"new_policy: --dir: {folder} already exists; nothing was written "
            "(choose another --name or --dir)",
            file=err,
        )
        return 2
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{VERSION}.", dir=parent))
    except OSError as exc:  # --dir is a file, read-only, ...
        print(
            f"new_policy: --dir: cannot create {parent}: {exc.strerror or exc}; "
            "nothing was written",
            file=err,
        )
        return 2
    try:
        for relative, text in files(args.name).items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_text(text, "utf-8")
        load_definition(staging / DEFINITION_FILE)  # never hand out an invalid folder
        staging.chmod(0o755)  # mkdtemp's 0700 would keep the folder from others
        staging.rename(folder)  # fails if the folder appeared meanwhile
    except BaseException:
        for path in sorted(staging.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        staging.rmdir()
        raise
    print(f"new_policy: wrote {folder}/", file=out)
    for relative in sorted(files(args.name)):
        print(f"  {relative}", file=out)
    print(
        f"next: edit them, then list the folder in a manifest "
        f"(policies: [{{name: {args.name}, uri: {folder}}}]) and build it with\n"
        "  tools/bazel run //builder:build -- --manifest /abs/path/policy-manifest.yaml",
        file=out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
