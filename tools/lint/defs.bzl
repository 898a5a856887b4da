"""`lint_test`: ruff (lint + format) and mypy over a set of Python files, as a test.

`bazel test //...` therefore fails on a lint or type error, like CI does.
"""

load("@rules_python//python:defs.bzl", "py_test")

# Everything mypy needs to see types of third-party imports.
_TYPE_DEPS = [
    "@pypi//cryptography",
    "@pypi//grpc_stubs",
    "@pypi//mypy",
    "@pypi//pyjwt",
    "@pypi//pytest",
    "@pypi//pytest_asyncio",
    "@pypi//types_jsonschema",
    "@pypi//types_protobuf",
    "@pypi//types_pyyaml",
]

def lint_test(name, srcs, deps = [], mypy = True, mypy_base = None, **kwargs):
    """Lint and type-check `srcs` with the repository's pyproject.toml settings.

    Args:
      name: target name (`lint_test` by convention).
      srcs: Python files (or filegroups of them) to check.
      deps: libraries the files import, so mypy sees their types.
      mypy: also run mypy (strict for code, relaxed for tests per pyproject.toml).
      mypy_base: a workspace-relative folder mypy treats as an extra package base
        (module names of files under it start there). Needed when a folder on the
        way is not a valid package name, such as a policy's `v1.0.0`.
      **kwargs: passed to py_test.
    """
    py_test(
        name = name,
        srcs = ["//tools/lint:lint.py"],
        main = "//tools/lint:lint.py",
        args = ["--ruff-wheel", "$(rootpath @pypi//ruff:whl)"] +
               ([] if mypy else ["--no-mypy"]) +
               (["--mypy-base", mypy_base] if mypy_base else []) +
               ["$(rootpaths %s)" % s for s in srcs],
        data = srcs + ["//:pyproject.toml", "@pypi//ruff:whl"],
        deps = deps + _TYPE_DEPS,
        **kwargs
    )
