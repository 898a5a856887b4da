"""builder.generate (the Bazel package) and builder/private/gen_registry.py (the registry)."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from builder.generate import copy_tree, generate, package_path, render_build_file
from builder.manifest import load_manifest
from builder.private import gen_registry
from builder.private.content_hash import content_hash
from builder.testing import write_manifest, write_policy
from builder.validate import validate
from controlplane.definitions import load_validation_registry

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "MODULE.bazel").write_text("")
    return ws


# ------------------------------------------------------------------ package


def test_package_path_is_an_identifier_and_depends_on_location(workspace: Path) -> None:
    first = package_path(workspace / "manifests" / "policy-manifest.yaml", workspace)
    assert first.startswith("generated/policy_manifest_")
    assert first.split("/")[1].isidentifier()
    assert first == package_path(workspace / "manifests" / "policy-manifest.yaml", workspace)
    assert first != package_path(workspace / "other" / "policy-manifest.yaml", workspace)
    assert package_path(Path("/tmp/9-x.yaml"), workspace).startswith("generated/m_9_x_")


def test_in_repo_by_label_out_of_repo_copied(tmp_path: Path, workspace: Path) -> None:
    write_policy(workspace / "policies" / "inside" / "v1.0.0", name="inside")
    write_policy(
        tmp_path / "outside",
        name="outside",
        extra_files={"helper.py": "X = 1\n", "__pycache__/junk.pyc": "", ".hidden": ""},
    )
    manifest_path = write_manifest(
        tmp_path / "policy-manifest.yaml",
        [
            {"name": "inside", "uri": str(workspace / "policies" / "inside" / "v1.0.0")},
            {"name": "outside", "uri": "outside"},
        ],
    )
    manifest = load_manifest(manifest_path)
    package = generate(manifest, validate(manifest), workspace)
    assert package.labels == (
        "//policies/inside/v1.0.0:policy",
        f"//{package.package}/policies/outside/v1.0.0:policy",
    )
    copy = package.folder / "policies" / "outside" / "v1.0.0"
    assert sorted(p.name for p in copy.iterdir()) == [
        "BUILD.bazel",
        "helper.py",
        "policy-definition.yaml",
        "policy.py",
    ]
    assert (package.folder / "policy-manifest.yaml").read_bytes() == manifest_path.read_bytes()
    build = (package.folder / "BUILD.bazel").read_text()
    calls = [
        n
        for n in ast.walk(ast.parse(build))
        if isinstance(n, ast.Call) and n.func.id == "policy_engine"  # type: ignore[attr-defined]
    ]
    assert len(calls) == 1
    assert '"//policies/inside/v1.0.0:policy",' in build


def test_regeneration_touches_nothing_and_drops_stale_copies(
    tmp_path: Path, workspace: Path
) -> None:
    write_policy(tmp_path / "a", name="a")
    write_policy(tmp_path / "b", name="b")
    both = [{"name": "a", "uri": "a"}, {"name": "b", "uri": "b"}]
    manifest_path = write_manifest(tmp_path / "policy-manifest.yaml", both)
    manifest = load_manifest(manifest_path)
    package = generate(manifest, validate(manifest), workspace)
    files = sorted(p for p in package.folder.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    generate(manifest, validate(manifest), workspace)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    write_manifest(manifest_path, both[:1])
    manifest = load_manifest(manifest_path)
    generate(manifest, validate(manifest), workspace)
    assert not (package.folder / "policies" / "b").exists()
    assert (package.folder / "policies" / "a" / "v1.0.0" / "policy.py").is_file()


def test_copy_tree_mirrors_exactly(tmp_path: Path) -> None:
    source = write_policy(tmp_path / "src", extra_files={"tests/test_x.py": "", "data.txt": "1"})
    target = tmp_path / "dst"
    (target / "old").mkdir(parents=True)
    (target / "old" / "stale.py").write_text("")
    copy_tree(source, target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == sorted(
        str(p.relative_to(source)) for p in source.rglob("*")
    )


def test_build_file_is_one_macro_call() -> None:
    manifest = load_manifest(REPO / "manifests" / "policy-manifest.yaml")
    text = render_build_file(manifest, ["//a:policy", "//b:policy"])
    tree = ast.parse(text)
    assert [type(n).__name__ for n in tree.body] == ["Expr", "Expr"]  # load(), policy_engine()


# ------------------------------------------------------------------ registry generator


def _hash_of(folder: Path) -> str:
    """The hash of the files the engine ships (BUILD.bazel and tests/ are not shipped)."""
    shipped = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".py", ".yaml")]
    return content_hash((p.name, p) for p in shipped)


def test_content_hash_is_content_only(tmp_path: Path) -> None:
    a = write_policy(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert _hash_of(a) == _hash_of(b)
    assert _hash_of(a).startswith("sha256:")
    (b / "policy.py").write_text((b / "policy.py").read_text() + "\n")
    assert _hash_of(a) != _hash_of(b)


def _generate_registry(root: Path, folders: list[str], package: str, **extra: str) -> Path:
    """Run the generator as the Bazel action does; ``root`` plays the runfiles root."""
    params = [
        {
            "label": f"//{folder}:policy",
            "folder": folder,
            "files": [
                {"path": str(p), "short": f"{folder}/{p.name}"}
                for p in sorted((root / folder).iterdir())
                if p.is_file() and p.suffix in (".py", ".yaml")
            ],
        }
        for folder in folders
    ]
    out = root / package
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    (out / "manifest.yaml").write_text("m")
    argv = [
        f"--params={out / 'params.json'}",
        f"--target=//{package}:engine",
        f"--package={package}",
        "--name=engine",
        "--builder-version=9.9.9",
        f"--manifest={out / 'manifest.yaml'}",
        f"--registry-out={out / 'engine_registry.py'}",
        f"--main-out={out / 'engine_main.py'}",
        f"--test-out={out / 'validation_test.py'}",
        f"--info-out={out / 'engine_build_info.json'}",
        f"--definitions-out={out / 'engine_definitions.json'}",
        f"--config-schema-out={out / 'engine_config.schema.json'}",
        *(f"--{k.replace('_', '-')}={v}" for k, v in extra.items()),
    ]
    assert gen_registry.main(argv) == 0
    return out / "engine_registry.py"


@pytest.fixture
def sample_root(tmp_path: Path) -> Path:
    root = tmp_path / "runfiles"
    for folder in ("policies/setHeader/v1.0.0", "policies/respond/v1.0.0"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("tests"))
    return root


def _import(path: Path, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cleanup_modules() -> Iterator[None]:
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_config_schema_written_with_every_policy(sample_root: Path) -> None:
    path = _generate_registry(
        sample_root, ["policies/setHeader/v1.0.0", "policies/respond/v1.0.0"], "generated/s"
    )
    schema = json.loads(path.with_name("engine_config.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["title"] == "Route configuration of //generated/s:engine"
    assert schema["$defs"]["entry"]["properties"]["name"]["enum"] == ["respond", "setHeader"]
    validator = Draft202012Validator(schema)
    entry = {"name": "setHeader", "version": "v1.0.0", "parameters": {"nope": 1}}
    assert not validator.is_valid({"routes": {"r": {"policies": [entry]}}})
    assert validator.is_valid({"routes": {"r": {"policies": []}}})


@pytest.mark.usefixtures("cleanup_modules")
def test_registry_loads_sorted_policies_with_hashes(sample_root: Path) -> None:
    path = _generate_registry(
        sample_root, ["policies/setHeader/v1.0.0", "policies/respond/v1.0.0"], "generated/x"
    )
    module = _import(path, "generated_x_engine_registry")
    registry = module.load_registry()  # type: ignore[attr-defined]
    assert [(p.name, p.version) for p in registry] == [
        ("respond", "v1.0.0"),
        ("setHeader", "v1.0.0"),
    ]
    expected = _hash_of(sample_root / "policies" / "setHeader" / "v1.0.0")
    assert registry.get("setHeader", "v1.0.0").content_hash == expected
    info = module.BUILD_INFO  # type: ignore[attr-defined]
    assert info["policy setHeader v1.0.0"] == expected
    assert info["build_time"] == "1970-01-01T00:00:00Z"
    assert info["source_revision"] == "unstamped"
    assert info["builder_version"] == "9.9.9"
    meta = json.loads((path.parent / "engine_build_info.json").read_text())
    assert meta == info
    main = (path.parent / "engine_main.py").read_text()
    assert "from generated.x.engine_registry import BUILD_INFO, DEFINITIONS, load_registry" in main
    definitions_file = module.DEFINITIONS  # type: ignore[attr-defined]
    assert definitions_file == path.parent / "engine_definitions.json"
    # The control plane's view of the same engine: same names, versions, hashes, schemas.
    definitions = load_validation_registry(path.parent / "engine_definitions.json")
    assert dict(definitions.build_info) == info
    assert [(p.name, p.version, p.content_hash) for p in definitions.registry] == [
        (p.name, p.version, p.content_hash) for p in registry
    ]
    for policy in definitions.registry:
        engine_side = registry.get(policy.name, policy.version).definition
        assert policy.definition.parameters_schema == engine_side.parameters_schema


def test_registry_is_reproducible_and_manifest_specific(sample_root: Path, tmp_path: Path) -> None:
    both = ["policies/setHeader/v1.0.0", "policies/respond/v1.0.0"]
    first = _generate_registry(sample_root, both, "generated/a").read_bytes()
    again = _generate_registry(sample_root, list(reversed(both)), "generated/a").read_bytes()
    assert first == again
    other = _generate_registry(sample_root, both[:1], "generated/a").read_bytes()
    assert other != first


def test_stamped_build_info(sample_root: Path, tmp_path: Path) -> None:
    stable = tmp_path / "stable-status.txt"
    stable.write_text("BUILD_EMBED_LABEL \nSTABLE_SOURCE_REVISION abc123-dirty\n")
    volatile = tmp_path / "volatile-status.txt"
    volatile.write_text(
        "BUILD_TIMESTAMP 1700000999\nBUILD_TIMESTAMP_SOURCE_DATE_EPOCH 1700000000\n"
    )
    path = _generate_registry(
        sample_root,
        ["policies/setHeader/v1.0.0"],
        "generated/s",
        stable_status=str(stable),
        volatile_status=str(volatile),
    )
    info = json.loads((path.parent / "engine_build_info.json").read_text())
    assert info["build_time"] == "2023-11-14T22:13:20Z"
    assert info["source_revision"] == "abc123-dirty"
    assert info["stamped"] == "true"


def test_source_date_epoch_without_stamping(
    sample_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    path = _generate_registry(sample_root, ["policies/setHeader/v1.0.0"], "generated/e")
    info = json.loads((path.parent / "engine_build_info.json").read_text())
    assert info["build_time"] == "1970-01-02T00:00:00Z"
    assert info["source_revision"] == "unstamped"


def test_generator_rejects_duplicates(
    sample_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(AssertionError):
        _generate_registry(
            sample_root, ["policies/setHeader/v1.0.0", "policies/setHeader/v1.0.0"], "generated/d"
        )
    assert "listed twice" in capsys.readouterr().err


def test_bad_source_date_epoch_is_a_clear_error(
    sample_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(SystemExit, match=r"SOURCE_DATE_EPOCH.*got 'yesterday'"):
        _generate_registry(sample_root, ["policies/setHeader/v1.0.0"], "generated/f")
