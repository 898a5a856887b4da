"""Generation of the Bazel package that builds one manifest's engine.

:func:`generate` writes ``<workspace>/generated/<stem>_<hash>/`` (ignored by git,
never committed):

* ``BUILD.bazel``: one call of ``policy_engine`` (``//builder:defs.bzl``) listing
  the policy labels in manifest order;
* ``policy-manifest.yaml``: a copy of the manifest (its hash goes into the build
  metadata);
* ``policies/<name>/<version>/``: a copy of every policy folder that lies outside
  the workspace (with its own ``BUILD.bazel``), so Bazel can see it. Policies
  inside the workspace are referenced where they are.

The package name depends only on where the manifest is (workspace-relative when
inside it), so rebuilding a manifest reuses its package, and files are rewritten
only when their content changes: a no-op rebuild changes nothing Bazel sees.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from builder.manifest import Manifest
from builder.validate import ValidatedPolicy

__all__ = [
    "ENGINE_TARGET",
    "GENERATED_DIR",
    "VALIDATION_TEST_TARGET",
    "GeneratedPackage",
    "copy_tree",
    "generate",
    "package_path",
    "policy_label",
    "render_build_file",
]

GENERATED_DIR: Final = "generated"
ENGINE_TARGET: Final = "engine"
VALIDATION_TEST_TARGET: Final = "validation_test"
MANIFEST_COPY: Final = "policy-manifest.yaml"
_COPIED_POLICIES: Final = "policies"
# Never copied from a policy folder: caches and editor/VCS droppings.
_SKIP_DIRS: Final = frozenset(
    {"__pycache__", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
)
_SKIP_SUFFIXES: Final = (".pyc", ".pyo", "~", ".swp")


@dataclass(frozen=True, slots=True)
class GeneratedPackage:
    """The written package: ``package`` is workspace-relative (``generated/x_0123abcd``)."""

    workspace: Path
    package: str
    labels: tuple[str, ...]

    @property
    def folder(self) -> Path:
        return self.workspace / self.package

    def target(self, name: str) -> str:
        return f"//{self.package}:{name}"


def _inside(path: Path, root: Path) -> Path | None:
    """``path`` relative to ``root`` if it lies inside it (symlinks resolved), else None."""
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return None


def package_path(manifest_path: Path, workspace: Path) -> str:
    """``generated/<stem>_<hash>``: stem sanitised to a Python identifier (the generated
    registry module is imported by its package path), hash of the manifest's location."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", manifest_path.stem).strip("_") or "manifest"
    if stem[0].isdigit():
        stem = f"m_{stem}"
    relative = _inside(manifest_path, workspace)
    where = relative.as_posix() if relative is not None else str(manifest_path.resolve())
    digest = hashlib.sha256(where.encode("utf-8")).hexdigest()[:10]
    return f"{GENERATED_DIR}/{stem}_{digest}"


def _is_buildable_in_place(folder: Path, workspace: Path) -> str | None:
    """Workspace-relative package of ``folder`` if Bazel can use it where it is."""
    relative = _inside(folder, workspace)
    if relative is None or not relative.parts:
        return None
    first = relative.parts[0]
    if first == GENERATED_DIR or first.startswith("bazel-") or first.startswith("."):
        return None
    return relative.as_posix()


def policy_label(policy: ValidatedPolicy, workspace: Path, package: str) -> str:
    """The label of the policy's ``policy_library`` (copied folders live in ``package``)."""
    in_place = _is_buildable_in_place(policy.folder, workspace)
    if in_place is not None:
        return f"//{in_place}:policy"
    name, version = policy.key
    return f"//{package}/{_COPIED_POLICIES}/{name}/{version}:policy"


def _files(root: Path) -> Iterator[Path]:
    """Regular files under ``root``, relative, sorted (deterministic)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            if filename.endswith(_SKIP_SUFFIXES) or filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            if path.is_file():
                yield path.relative_to(root)


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data)


def copy_tree(source: Path, target: Path) -> None:
    """Make ``target`` hold exactly the files of ``source`` (bytes only, no metadata);
    unchanged files are left untouched and stale ones removed."""
    wanted = set(_files(source))
    for relative in sorted(wanted):
        _write_if_changed(target / relative, (source / relative).read_bytes())
    if target.is_dir():
        for relative in list(_files(target)):
            if relative not in wanted:
                (target / relative).unlink()
        _remove_empty_dirs(target)


def _remove_empty_dirs(root: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(root), key=lambda item: -len(item[0])):
        path = Path(dirpath)
        if path != root and not any(path.iterdir()):
            path.rmdir()


def render_build_file(manifest: Manifest, labels: Sequence[str]) -> str:
    """The generated ``BUILD.bazel``: one ``policy_engine`` call."""
    policies = "".join(f'        "{label}",\n' for label in labels)
    return (
        f"# GENERATED by //builder from {manifest.path.name}; do not edit (rewritten by\n"
        "# every `bazel run //builder:build`). See builder/README.md.\n"
        'load("//builder:defs.bzl", "policy_engine")\n'
        "\n"
        "policy_engine(\n"
        f'    name = "{ENGINE_TARGET}",\n'
        f'    manifest = "{MANIFEST_COPY}",\n'
        "    policies = [\n"
        f"{policies}"
        "    ],\n"
        ")\n"
    )


def generate(
    manifest: Manifest, policies: Sequence[ValidatedPolicy], workspace: Path
) -> GeneratedPackage:
    """Write (or refresh) the manifest's package under ``workspace``; return it."""
    package = package_path(manifest.path, workspace)
    folder = workspace / package
    folder.mkdir(parents=True, exist_ok=True)
    labels: list[str] = []
    copied: set[str] = set()
    for policy in policies:
        label = policy_label(policy, workspace, package)
        labels.append(label)
        if label.startswith(f"//{package}/"):
            name, version = policy.key
            copy_tree(policy.folder, folder / _COPIED_POLICIES / name / version)
            copied.add(f"{name}/{version}")
    # Policies copied for an earlier version of this manifest but no longer listed.
    copies = folder / _COPIED_POLICIES
    if copies.is_dir():
        for name_dir in sorted(copies.iterdir()):
            for version_dir in sorted(name_dir.iterdir()) if name_dir.is_dir() else []:
                if f"{name_dir.name}/{version_dir.name}" not in copied:
                    shutil.rmtree(version_dir)
            if name_dir.is_dir() and not any(name_dir.iterdir()):
                name_dir.rmdir()
        if not any(copies.iterdir()):
            copies.rmdir()
    _write_if_changed(folder / MANIFEST_COPY, manifest.path.read_bytes())
    _write_if_changed(folder / "BUILD.bazel", render_build_file(manifest, labels).encode("utf-8"))
    return GeneratedPackage(workspace=workspace, package=package, labels=tuple(labels))
