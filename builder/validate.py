"""Validation of every policy a manifest lists, before anything is generated or built.

:func:`validate` checks, for each manifest entry, and reports every problem at once:

* folder structure: the ``uri`` folder exists and holds ``policy-definition.yaml``,
  ``BUILD.bazel`` (which calls ``policy_library``) and ``policy.py``;
* the definition against the meta-schema (:func:`engine.definition.load_definition`);
* the manifest's ``name`` (and ``version``, when given) equal the definition's;
* the code implements the contract, checked statically with :mod:`ast` (no policy
  code runs here): a top-level ``class Policy`` whose ``__init__`` takes the
  parameters mapping, with ``on_request`` / ``on_response`` for the declared phases;
* no two entries resolve to the same name + version (the error names both uris).

Each message reads ``<manifest>: policies[i] (<name>): <file>: <field>: <problem>``.
The generated validation test later imports every policy for real.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from builder.errors import ValidationError
from builder.manifest import Manifest, ManifestEntry
from engine.definition import DEFINITION_FILE, PolicyDefinition, load_definition
from engine.errors import DefinitionError
from engine.registry import POLICY_MODULE

__all__ = [
    "BUILD_FILE",
    "MACRO",
    "ValidatedPolicy",
    "check_build_file",
    "check_policy_code",
    "validate",
    "validate_entry",
]

BUILD_FILE: Final = "BUILD.bazel"
MACRO: Final = "policy_library"
_HOOKS: Final = (("request", "on_request"), ("response", "on_response"))


@dataclass(frozen=True, slots=True)
class ValidatedPolicy:
    """A manifest entry whose folder, definition and code passed validation."""

    entry: ManifestEntry
    definition: PolicyDefinition

    @property
    def folder(self) -> Path:
        return self.entry.folder

    @property
    def key(self) -> tuple[str, str]:
        return self.definition.key


def _parse(path: Path) -> ast.Module | str:
    """``path`` parsed as Python (Starlark parses as Python too), or the problem."""
    try:
        return ast.parse(path.read_text("utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        return f"{path}: cannot read: {exc}"
    except SyntaxError as exc:
        return f"{path}: line {exc.lineno}: syntax error: {exc.msg}"


def check_build_file(path: Path) -> list[str]:
    """Problems of a policy's ``BUILD.bazel``: it must parse and call ``policy_library``."""
    tree = _parse(path)
    if isinstance(tree, str):
        return [tree]
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == MACRO
    ]
    if not calls:
        return [f"{path}: must call {MACRO}() (load it from //builder:defs.bzl)"]
    return []


def _positional(args: ast.arguments) -> list[ast.arg]:
    return [*args.posonlyargs, *args.args]


def _init_problem(init: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """Why ``Policy(params)`` would fail with this ``__init__`` (None if it works)."""
    if isinstance(init, ast.AsyncFunctionDef):
        return "__init__ must not be async"
    args = init.args
    positional = _positional(args)
    # self + params; every further positional or keyword-only argument needs a default.
    if len(positional) < 2 and args.vararg is None:
        return "__init__ must take the parameters mapping: def __init__(self, params)"
    without_default = len(positional) - len(args.defaults)
    if without_default > 2:
        extra = ", ".join(a.arg for a in positional[2:without_default])
        return f"__init__ arguments after params need defaults: {extra}"
    required_kw = [
        a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None
    ]
    if required_kw:
        return f"__init__ keyword-only arguments need defaults: {', '.join(required_kw)}"
    return None


def check_policy_code(path: Path, phases: Sequence[str]) -> list[str]:
    """Static contract check of ``policy.py`` for a definition declaring ``phases``."""
    tree = _parse(path)
    if isinstance(tree, str):
        return [tree]
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Policy"]
    if not classes:
        return [f"{path}: Policy: no top-level class named 'Policy'"]
    cls = classes[-1]  # the last definition wins at import time
    methods = {
        node.name: node
        for node in cls.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    problems: list[str] = []
    init = methods.get("__init__")
    if init is None:
        problems.append(
            f"{path}: line {cls.lineno}: Policy.__init__: missing "
            "(the engine calls Policy(params) with the validated parameters)"
        )
    else:
        why = _init_problem(init)
        if why is not None:
            problems.append(f"{path}: line {init.lineno}: Policy.__init__: {why}")
    for phase, hook in _HOOKS:
        if phase in phases and hook not in methods:
            problems.append(
                f"{path}: line {cls.lineno}: Policy.{hook}: missing "
                f"(the definition declares the {phase} phase)"
            )
    return problems


def _in_entry(manifest: Manifest, entry: ManifestEntry, lines: Sequence[str]) -> list[str]:
    return [f"{manifest.path}: {entry.label}: {line}" for line in lines]


def validate_entry(
    manifest: Manifest, entry: ManifestEntry
) -> tuple[ValidatedPolicy | None, list[str]]:
    """Validate one entry: ``(policy, [])`` when valid, else ``(None | policy, errors)``.

    A policy is returned whenever its definition loaded (even if its code has
    problems), so that name + version conflicts can still be detected.
    """
    folder = entry.folder
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        return None, _in_entry(manifest, entry, [f"uri: {entry.uri!r}: {folder} {what}"])

    problems: list[str] = []
    for required in (DEFINITION_FILE, BUILD_FILE, POLICY_MODULE):
        if not (folder / required).is_file():
            problems.append(f"{folder / required}: missing (every policy folder needs one)")
    if (folder / BUILD_FILE).is_file():
        problems.extend(check_build_file(folder / BUILD_FILE))

    definition: PolicyDefinition | None = None
    if (folder / DEFINITION_FILE).is_file():
        try:
            definition = load_definition(folder / DEFINITION_FILE)
        except DefinitionError as exc:
            problems.extend(exc.errors)
    if definition is not None:
        source = definition.source
        if definition.name != entry.name:
            problems.append(
                f"{source}: name: {definition.name!r} does not match the manifest's "
                f"name {entry.name!r}"
            )
        if entry.version is not None and definition.version != entry.version:
            problems.append(
                f"{source}: version: {definition.version!r} does not match the manifest's "
                f"version {entry.version!r}"
            )
        if (folder / POLICY_MODULE).is_file():
            problems.extend(check_policy_code(folder / POLICY_MODULE, sorted(definition.phases)))

    policy = ValidatedPolicy(entry, definition) if definition is not None else None
    return policy, _in_entry(manifest, entry, problems)


def _conflicts(manifest: Manifest, policies: Sequence[ValidatedPolicy]) -> list[str]:
    first: dict[tuple[str, str], ValidatedPolicy] = {}
    problems: list[str] = []
    for policy in policies:
        other = first.setdefault(policy.key, policy)
        if other is policy:
            continue
        name, version = policy.key
        problems.append(
            f"{manifest.path}: {policy.entry.label}: conflict: policy {name!r} version "
            f"{version} is provided twice: {other.entry.label} uri {other.entry.uri!r} "
            f"({other.folder}) and {policy.entry.label} uri {policy.entry.uri!r} "
            f"({policy.folder})"
        )
    return problems


def validate(manifest: Manifest) -> list[ValidatedPolicy]:
    """Validate every entry; return them in manifest order or raise
    :class:`ValidationError` listing every problem of every entry."""
    policies: list[ValidatedPolicy] = []
    problems: list[str] = []
    for entry in manifest.entries:
        policy, errors = validate_entry(manifest, entry)
        problems.extend(errors)
        if policy is not None:
            policies.append(policy)
    problems.extend(_conflicts(manifest, policies))
    if problems:
        raise ValidationError(problems)
    return policies
