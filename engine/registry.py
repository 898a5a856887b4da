"""The policy registry: which policy name + version this engine can run.

The engine has no built-in policies. The builder generates a module that calls
:func:`load_policy` once per policy folder (from Bazel runfiles) and hands the
results to :class:`PolicyRegistry`; nothing registers itself at import time.

A policy folder holds ``policy-definition.yaml`` and ``policy.py``. The module is
imported as ``policy_engine_policies.<name>_<version>.policy`` inside a synthetic
package whose ``__path__`` is the folder, so a policy may import its sibling
modules with ``from . import helper`` and two versions of one policy never clash
in ``sys.modules``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import logging
import sys
import traceback
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engine.definition import (
    DEFINITION_FILE,
    PolicyDefinition,
    example_failures,
    load_definition,
    version_key,
)
from engine.errors import RegistryError
from engine.policy import ParameterError
from engine.secrets import parameters_secrets, scrub

__all__ = [
    "POLICY_MODULE",
    "PolicyRegistry",
    "RegisteredPolicy",
    "instantiate",
    "load_policy",
    "package_name",
]

POLICY_MODULE: Final = "policy.py"
_log: Final = logging.getLogger("engine.registry")
_ROOT_PACKAGE: Final = "policy_engine_policies"


@dataclass(frozen=True, slots=True)
class RegisteredPolicy:
    """A policy the engine can instantiate: its definition and its class.

    ``factory`` is called with the validated parameters (defaults filled in) and
    returns the policy instance. ``content_hash`` identifies the policy's files
    (filled in by the builder; empty when loaded directly).
    """

    definition: PolicyDefinition
    factory: Callable[[Mapping[str, Any]], object]
    content_hash: str = ""

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def version(self) -> str:
        return self.definition.version

    def check_examples(self) -> list[str]:
        """Run the definition's ``examples`` through the whole config-time path:
        the parameter schema, then the constructor (which may reject, with a
        :class:`~engine.policy.ParameterError`, what a schema cannot express).
        Returns one line per example that does not behave as declared."""
        failures: list[str] = []
        for index, example in enumerate(self.definition.examples):
            params, errors = self.definition.validate_parameters(example["parameters"])
            if not errors:
                _, error = instantiate(self, params)
                errors = [error] if error else []
            failures += example_failures(index, example, errors)
        return failures


def instantiate(policy: RegisteredPolicy, params: Mapping[str, Any]) -> tuple[object | None, str]:
    """Construct ``policy`` with already validated ``params``: (instance, "") or
    (None, the rejection as ``field: message``). Never raises for the policy's fault:
    a constructor that crashes is reported, so a policy bug rejects a config instead
    of taking the engine down."""
    try:
        return policy.factory(params), ""
    except ParameterError as exc:
        return None, _scrubbed(policy, params, f"{exc.field}: {exc.message}")
    except ValueError as exc:
        return None, _scrubbed(policy, params, str(exc))
    except Exception as exc:
        # The traceback is logged as text so that the secrets the policy's message may
        # quote are scrubbed from it too.
        trace = "".join(traceback.format_exception(exc))
        _log.error(
            "%s %s: constructor raised\n%s",
            policy.name,
            policy.version,
            _scrubbed(policy, params, trace.rstrip()),
        )
        return None, _scrubbed(policy, params, f"constructor failed: {type(exc).__name__}: {exc}")


def _scrubbed(policy: RegisteredPolicy, params: Mapping[str, Any], text: str) -> str:
    """``text`` (a policy's own words) without the secret parameters' values: a
    constructor may quote what it rejects."""
    return scrub(text, parameters_secrets(params, policy.definition.secrets))


class PolicyRegistry:
    """Immutable map of ``(name, version)`` -> :class:`RegisteredPolicy`.

    Raises :class:`RegistryError` when two entries share a name and version (the
    message names both sources). Iteration is sorted by name, then version.
    """

    __slots__ = ("_by_key", "_versions")

    def __init__(self, entries: Iterable[RegisteredPolicy]) -> None:
        by_key: dict[tuple[str, str], RegisteredPolicy] = {}
        duplicates: list[str] = []
        for entry in entries:
            key = entry.definition.key
            if key in by_key:
                duplicates.append(
                    f"policy {key[0]!r} version {key[1]} is registered twice: "
                    f"{by_key[key].definition.source} and {entry.definition.source}"
                )
                continue
            by_key[key] = entry
        if duplicates:
            raise RegistryError("\n".join(duplicates))
        versions: dict[str, list[str]] = {}
        for name, version in by_key:
            versions.setdefault(name, []).append(version)
        self._versions = {
            name: sorted(found, key=version_key) for name, found in sorted(versions.items())
        }
        self._by_key = by_key

    def get(self, name: str, version: str) -> RegisteredPolicy:
        """The policy ``name`` at ``version``; :class:`RegistryError` says what exists."""
        entry = self._by_key.get((name, version))
        if entry is not None:
            return entry
        available = self._versions.get(name)
        if available:
            raise RegistryError(
                f"policy {name!r} version {version} is not in this engine "
                f"(versions available: {', '.join(available)})"
            )
        names = ", ".join(self._versions) or "none"
        raise RegistryError(f"policy {name!r} is not in this engine (policies available: {names})")

    def versions(self, name: str) -> list[str]:
        """Versions of ``name`` in this engine, oldest first (empty if unknown)."""
        return list(self._versions.get(name, ()))

    def names(self) -> list[str]:
        """Every policy name, sorted."""
        return list(self._versions)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[RegisteredPolicy]:
        for name, versions in self._versions.items():
            for version in versions:
                yield self._by_key[(name, version)]

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        keys = ", ".join(f"{e.name} {e.version}" for e in self)
        return f"PolicyRegistry({keys})"


def package_name(definition: PolicyDefinition) -> str:
    """``policy_engine_policies.jwtValidation_v1_0_0`` for jwtValidation v1.0.0."""
    version = definition.version.replace(".", "_").replace("-", "_")
    return f"{_ROOT_PACKAGE}.{definition.name}_{version}"


def _ensure_root_package() -> None:
    if _ROOT_PACKAGE not in sys.modules:
        root = types.ModuleType(_ROOT_PACKAGE, "Synthetic parent of every loaded policy package.")
        root.__path__ = []  # a package with no files: children are created explicitly
        sys.modules[_ROOT_PACKAGE] = root


def _fresh_package(name: str, folder: Path) -> types.ModuleType:
    """Create (or replace) the synthetic package ``name`` rooted at ``folder``.

    Submodules cached from an earlier load of the same name are dropped so that a
    reload from another folder never mixes files of two folders.
    """
    for module_name in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module_name]
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
    setattr(sys.modules[_ROOT_PACKAGE], name.rpartition(".")[2], package)
    return package


def _import_policy_module(definition: PolicyDefinition, folder: Path) -> types.ModuleType:
    code = folder / POLICY_MODULE
    if not code.is_file():
        raise RegistryError(f"{code}: missing (every policy folder needs a {POLICY_MODULE})")
    _ensure_root_package()
    package = _fresh_package(package_name(definition), folder)
    module_name = f"{package.__name__}.policy"
    spec = importlib.util.spec_from_file_location(module_name, code)
    if spec is None or spec.loader is None:
        raise RegistryError(f"{code}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # any failure of third-party code becomes one clear error
        del sys.modules[module_name]
        raise RegistryError(f"{code}: import failed: {type(exc).__name__}: {exc}") from exc
    vars(package)["policy"] = module  # as the import system binds submodules
    return module


def _check_policy_class(definition: PolicyDefinition, module: types.ModuleType) -> type:
    code = module.__file__
    cls = getattr(module, "Policy", None)
    if not inspect.isclass(cls):
        raise RegistryError(f"{code}: must define a class named 'Policy'")
    hooks = [("request", "on_request"), ("response", "on_response")]
    missing = [
        f"{method} (the definition declares the {phase} phase)"
        for phase, method in hooks
        if phase in definition.phases and not callable(getattr(cls, method, None))
    ]
    if missing:
        raise RegistryError(f"{code}: class Policy is missing {', '.join(missing)}")
    try:
        inspect.signature(cls).bind({})
    except TypeError as exc:
        raise RegistryError(
            f"{code}: Policy(params) must accept the parameters mapping as its one argument: {exc}"
        ) from exc
    except ValueError:
        pass  # no signature available (C extension class): trust it
    return cls


def load_policy(folder: str | Path, *, content_hash: str = "") -> RegisteredPolicy:
    """Load the policy in ``folder``: validate its definition, import its code.

    Raises :class:`~engine.errors.DefinitionError` for an invalid definition and
    :class:`RegistryError` naming the file for a missing or failing
    ``policy.py``, a missing ``Policy`` class, or a missing phase hook. Loading
    the same name and version again re-imports it (and replaces the modules).
    """
    folder = Path(folder)
    definition = load_definition(folder / DEFINITION_FILE)
    module = _import_policy_module(definition, folder)
    factory = _check_policy_class(definition, module)
    return RegisteredPolicy(definition=definition, factory=factory, content_hash=content_hash)
