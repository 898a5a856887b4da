"""Tests of engine.registry: loading policy folders and looking policies up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.errors import DefinitionError, RegistryError
from engine.registry import PolicyRegistry, RegisteredPolicy, load_policy, package_name
from tests.support import policy_folder, registry_from, write_policy


def test_load_policy_imports_policy_class() -> None:
    entry = load_policy(policy_folder("addHeader"), content_hash="abc")
    assert entry.name == "addHeader"
    assert entry.version == "v1.0.0"
    assert entry.content_hash == "abc"
    assert entry.factory.__name__ == "Policy"
    assert entry.factory.__module__ == "policy_engine_policies.addHeader_v1_0_0.policy"
    assert sys.modules[entry.factory.__module__].__file__ == str(
        policy_folder("addHeader") / "policy.py"
    )


def test_package_name_is_per_version(tmp_path: Path) -> None:
    one = load_policy(write_policy(tmp_path, "multi", "v1.0.0"))
    two = load_policy(write_policy(tmp_path, "multi", "v2.10.0"))
    assert package_name(one.definition) == "policy_engine_policies.multi_v1_0_0"
    assert package_name(two.definition) == "policy_engine_policies.multi_v2_10_0"
    assert one.factory is not two.factory


def test_policy_can_import_sibling_modules(tmp_path: Path) -> None:
    folder = write_policy(
        tmp_path,
        "sibling",
        code="""
            from . import helper

            class Policy:
                def __init__(self, params):
                    self.greeting = helper.GREETING

                def on_request(self, ctx):
                    return None
        """,
        extra={"helper.py": "GREETING = 'hi'\n"},
    )
    entry = load_policy(folder)
    assert entry.factory({}).greeting == "hi"  # type: ignore[attr-defined]


def test_reload_from_another_folder_drops_stale_siblings(tmp_path: Path) -> None:
    code = """
        from . import helper

        class Policy:
            def __init__(self, params):
                self.value = helper.VALUE

            def on_request(self, ctx):
                return None
    """
    first = write_policy(tmp_path / "a", "stale", code=code, extra={"helper.py": "VALUE = 1\n"})
    second = write_policy(tmp_path / "b", "stale", code=code, extra={"helper.py": "VALUE = 2\n"})
    assert load_policy(first).factory({}).value == 1  # type: ignore[attr-defined]
    assert load_policy(second).factory({}).value == 2  # type: ignore[attr-defined]


HOOKLESS = """
    class Policy:
        def __init__(self, params):
            pass
"""


@pytest.mark.parametrize(
    ("phases", "code", "expected"),
    [
        pytest.param(
            "[request]",
            HOOKLESS,
            "policy.py: class Policy is missing on_request (the definition declares the "
            "request phase)",
            id="no-on-request",
        ),
        pytest.param(
            "[request, response]",
            HOOKLESS,
            "policy.py: class Policy is missing on_request (the definition declares the request "
            "phase), on_response (the definition declares the response phase)",
            id="no-hooks",
        ),
        pytest.param(
            "[response]",
            "class Policy:\n    on_response = 'not callable'\n",
            "policy.py: class Policy is missing on_response",
            id="hook-not-callable",
        ),
        pytest.param(
            "[request]",
            "class Other:\n    pass\n",
            "policy.py: must define a class named 'Policy'",
            id="no-policy-class",
        ),
        pytest.param(
            "[request]",
            "Policy = 3\n",
            "policy.py: must define a class named 'Policy'",
            id="policy-not-a-class",
        ),
        pytest.param(
            "[request]",
            "class Policy:\n    def __init__(self):\n        pass\n    def on_request(self, c):\n"
            "        pass\n",
            "policy.py: Policy(params) must accept the parameters mapping as its one argument",
            id="constructor-signature",
        ),
        pytest.param(
            "[request]",
            "def broken(:\n",
            "policy.py: import failed: SyntaxError: ",
            id="syntax-error",
        ),
        pytest.param(
            "[request]",
            "import does_not_exist_anywhere\n",
            "policy.py: import failed: ModuleNotFoundError: No module named "
            "'does_not_exist_anywhere'",
            id="import-error",
        ),
        pytest.param(
            "[request]",
            "raise RuntimeError('no config')\n",
            "policy.py: import failed: RuntimeError: no config",
            id="raises-at-import",
        ),
    ],
)
def test_load_policy_rejections(tmp_path: Path, phases: str, code: str, expected: str) -> None:
    definition = f"name: bad\nversion: v1.0.0\ndescription: d\nphases: {phases}\n"
    folder = write_policy(tmp_path, "bad", definition=definition, code=code)
    with pytest.raises(RegistryError) as info:
        load_policy(folder)
    assert str(info.value).startswith(f"{folder / expected}")


def test_missing_policy_module(tmp_path: Path) -> None:
    folder = write_policy(tmp_path, "nocode")
    (folder / "policy.py").unlink()
    with pytest.raises(RegistryError, match=r"policy\.py: missing"):
        load_policy(folder)


def test_invalid_definition_is_a_definition_error(tmp_path: Path) -> None:
    definition = "name: bad\nversion: v1.0.0\ndescription: d\nphases: [both]\n"
    folder = write_policy(tmp_path, "bad", definition=definition)
    with pytest.raises(DefinitionError, match=r"policy-definition.yaml: phases\[0\]: 'both'"):
        load_policy(folder)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> PolicyRegistry:
    root = tmp_path_factory.mktemp("policies")
    return registry_from(
        "addHeader",
        "deny",
        write_policy(root, "jwtValidation", "v2.0.0"),
        write_policy(root, "jwtValidation", "v10.0.0"),
        write_policy(root, "jwtValidation", "v1.0.0"),
    )


def test_registry_lookup(registry: PolicyRegistry) -> None:
    assert registry.get("jwtValidation", "v2.0.0").version == "v2.0.0"
    assert registry.versions("jwtValidation") == ["v1.0.0", "v2.0.0", "v10.0.0"]
    assert registry.versions("nope") == []
    assert registry.names() == ["addHeader", "deny", "jwtValidation"]
    assert len(registry) == 5
    assert [(e.name, e.version) for e in registry][:3] == [
        ("addHeader", "v1.0.0"),
        ("deny", "v1.0.0"),
        ("jwtValidation", "v1.0.0"),
    ]
    assert ("deny", "v1.0.0") in registry


@pytest.mark.parametrize(
    ("name", "version", "expected"),
    [
        pytest.param(
            "jwtValidation",
            "v3.0.0",
            "policy 'jwtValidation' version v3.0.0 is not in this engine "
            "(versions available: v1.0.0, v2.0.0, v10.0.0)",
            id="unknown-version",
        ),
        pytest.param(
            "rateLimit",
            "v1.0.0",
            "policy 'rateLimit' is not in this engine "
            "(policies available: addHeader, deny, jwtValidation)",
            id="unknown-name",
        ),
    ],
)
def test_registry_lookup_errors(
    registry: PolicyRegistry, name: str, version: str, expected: str
) -> None:
    with pytest.raises(RegistryError) as info:
        registry.get(name, version)
    assert str(info.value) == expected


def test_empty_registry() -> None:
    with pytest.raises(RegistryError, match=r"\(policies available: none\)"):
        PolicyRegistry(()).get("x", "v1.0.0")


def test_duplicate_registration_names_both_sources(tmp_path: Path) -> None:
    first = load_policy(write_policy(tmp_path / "a", "twice"))
    second = load_policy(write_policy(tmp_path / "b", "twice"))
    with pytest.raises(RegistryError) as info:
        PolicyRegistry([first, second])
    assert str(info.value) == (
        "policy 'twice' version v1.0.0 is registered twice: "
        f"{first.definition.source} and {second.definition.source}"
    )


def test_registered_policy_is_frozen() -> None:
    entry = load_policy(policy_folder("deny"))
    with pytest.raises(AttributeError):
        entry.content_hash = "x"  # type: ignore[misc]
    assert isinstance(entry, RegisteredPolicy)


FUSSY_DEFINITION = """
    name: fussy
    version: v1.0.0
    description: a constructor that rejects what its schema cannot express
    phases: [request]
    parameters:
      low: {type: integer, required: true}
      high: {type: integer, required: true}
    examples:
      - description: ordered
        parameters: {low: 1, high: 2}
        valid: true
      - description: reversed (only the constructor can tell)
        parameters: {low: 2, high: 1}
        valid: false
        error: "high: must be greater than low"
      - description: reversed but declared valid
        parameters: {low: 3, high: 1}
        valid: true
"""

FUSSY_CODE = """
    from engine.policy import ParameterError


    class Policy:
        def __init__(self, params):
            if params["high"] <= params["low"]:
                raise ParameterError("high", "must be greater than low")

        def on_request(self, ctx):
            return None
"""


def test_check_examples_runs_the_constructor_too(tmp_path: Path) -> None:
    policy = load_policy(
        write_policy(tmp_path, "fussy", definition=FUSSY_DEFINITION, code=FUSSY_CODE)
    )
    # The schema alone accepts every example; the constructor rejects two of them.
    assert policy.definition.check_examples() == [
        "examples[1] (reversed (only the constructor can tell)): expected an error, got none"
    ]
    assert policy.check_examples() == [
        "examples[2] (reversed but declared valid): expected valid, got: "
        "high: must be greater than low"
    ]
