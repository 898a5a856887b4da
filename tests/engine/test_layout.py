"""The engine's layout holds: the runtime knows nothing of the transports above it.

``engine/transport/`` (the gRPC and HTTP ext_proc servers and their stream machine) imports
the runtime; no runtime module imports ``engine.transport``, so the runtime can be read,
tested and reused without either transport. Only the entry points put the two together.
Nothing under ``engine/`` imports the control plane, the builder, a policy or the
repository's tools and tests: an engine image ships the engine package alone.

Imports are read with :mod:`ast` from the source files (every form: ``import``, ``from``,
relative, under ``TYPE_CHECKING``, ``importlib.import_module("...")``), never by importing
them. Under Bazel the files are the test's data (``//engine:py_files``).

``engine/README.md`` lists every engine module in its table, and only modules that exist.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Final

import pytest

REPO: Final = Path(__file__).absolute().parents[2]
ENGINE: Final = REPO / "engine"
TRANSPORT: Final = "engine.transport"
ENTRY_POINTS: Final = frozenset(
    {"engine.bin", "engine.healthcheck", "engine.main", "engine.explain_cli"}
)
"""Modules that may import the transports: they start an engine (or ask one)."""
FOREIGN: Final = frozenset({"builder", "controlplane", "policies", "tests", "tools"})
"""Top-level packages of this repository that no engine module may import."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p for p in sorted(ENGINE.rglob("*.py")) if "__pycache__" not in p.parts
    }


MODULES: Final = _modules()


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of a relative import ``from <level dots><name> import ...``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join([*base, name] if name else base)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, with ``from X import y`` giving both ``X``
    and ``X.y`` (``y`` may be a submodule)."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                called in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                found.add(first.value)
    return found


def _is_transport(name: str) -> bool:
    return name == TRANSPORT or name.startswith(TRANSPORT + ".")


def runtime_modules() -> dict[str, Path]:
    """The engine's modules outside ``engine.transport`` and the entry points."""
    return {
        name: path
        for name, path in MODULES.items()
        if not _is_transport(name) and name not in ENTRY_POINTS and name != "engine"
    }


def test_the_layout_is_found():
    """Guards the tests below against passing on an empty or misplaced tree."""
    runtime = runtime_modules()
    for name in ("engine.chain", "engine.store", "engine.policy", "engine.xds.client"):
        assert name in runtime
    transport = [name for name in MODULES if _is_transport(name)]
    for name in ("stream", "grpc_service", "http_service", "server"):
        assert f"{TRANSPORT}.{name}" in transport
    assert ENTRY_POINTS - {"engine.bin"} <= MODULES.keys()  # bin.py: not in the library


@pytest.mark.parametrize("name", sorted(runtime_modules()))
def test_the_runtime_does_not_import_the_transports(name):
    bad = sorted(i for i in imported(MODULES[name]) if _is_transport(i))
    assert not bad, (
        f"{name} (runtime) imports {bad}: the runtime must not know the transports; move the "
        "code that needs them into engine/transport/ or an entry point"
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_engine_imports_nothing_from_the_rest_of_the_repository(name):
    bad = sorted(i for i in imported(MODULES[name]) if i.split(".")[0] in FOREIGN)
    assert not bad, f"{name} imports {bad}: an engine ships the engine package alone"


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("import engine.transport.stream", True),
        ("from engine.transport import server", True),
        ("from engine.transport.messages import immediate", True),
        ("from engine import metrics, transport", True),
        ("from .transport import stream", True),
        ("from . import transport", True),
        ("if TYPE_CHECKING:\n    from engine.transport.stream import Phase", True),
        ("importlib.import_module('engine.transport.grpc_service')", True),
        ("from engine import metrics", False),
        ("from engine.streaming import BodyStream", False),
        ("import engine.transports_elsewhere", False),
    ],
    ids=lambda value: value if isinstance(value, bool) else value.split("\n")[-1].strip(),
)
def test_every_import_form_is_seen(tmp_path, monkeypatch, source, caught):
    """The check itself: an import of the transports in any form is caught (as if it were a
    line of engine/chain.py), and nothing else is."""
    module = tmp_path / "engine" / "chain.py"
    module.parent.mkdir()
    module.write_text(source + "\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert any(_is_transport(i) for i in imported(module)) is caught


_ROW: Final = re.compile(r"^\| `([^`]+\.py)` \|", re.M)


def test_the_engine_readme_lists_every_module():
    listed = set(_ROW.findall((ENGINE / "README.md").read_text()))
    present = {
        str(path.relative_to(ENGINE)) for path in MODULES.values() if path.name != "__init__.py"
    }
    assert sorted(present - listed) == [], "engine modules missing from engine/README.md"
    assert sorted(listed - present) == [], "engine/README.md lists modules that do not exist"
