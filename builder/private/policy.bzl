"""Implementation of `policy_library` (public doc: //builder:defs.bzl)."""

load("@rules_python//python:defs.bzl", "py_library")
load("//tools/lint:defs.bzl", "lint_test")
load("//tools/pytest:defs.bzl", "pytest_tests")
load(":generated.bzl", "generated_tags")

DEFINITION = "policy-definition.yaml"

def policy_library(name = "policy", deps = [], test_deps = [], data = [], visibility = None):
    """See //builder:defs.bzl."""
    tags = generated_tags()
    srcs = native.glob(["*.py"])
    deps = ["//engine:runtime"] + deps
    py_library(
        name = name,
        srcs = srcs,
        data = [DEFINITION] + data,
        deps = deps,
        visibility = visibility or ["//visibility:public"],
    )
    native.filegroup(
        name = name + "_files",
        srcs = srcs + [DEFINITION] + data,
        visibility = visibility or ["//visibility:public"],
    )

    tests = native.glob(["tests/test_*.py"], allow_empty = True)
    test_helpers = native.glob(["tests/*.py"], exclude = tests, allow_empty = True)
    pytest_tests(
        srcs = tests,
        helpers = test_helpers,
        deps = [":" + name] + test_deps,  # the library brings `deps`
        tags = tags,
    )
    lint_test(
        name = "lint_test",
        srcs = srcs + tests + test_helpers,
        deps = [":" + name] + test_deps,  # the library brings `deps`
        # A version folder (v1.0.0) is not a Python package name: mypy sees the folder
        # as a base, so policy.py is module `policy` and tests/x.py is `tests.x`.
        mypy_base = native.package_name(),
        tags = tags,
    )
