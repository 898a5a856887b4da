"""`pytest_test`: a py_test that runs its sources with pytest, as plain `pytest` would.

The repository's pyproject.toml (pytest options: asyncio mode, warnings as errors)
is a data dependency, so a test behaves the same under Bazel and from the shell.
"""

load("@rules_python//python:defs.bzl", "py_test")

def pytest_test(name, srcs, deps = [], data = [], args = [], **kwargs):
    """One py_test target running `pytest` on `srcs`.

    Args:
      name: target name (`<module>_test` by convention).
      srcs: the test files (and local helpers such as conftest.py).
      deps: libraries under test and their requirements.
      data: files the tests read at run time.
      args: extra pytest arguments.
      **kwargs: passed to py_test (size, tags, env, timeout, ...).
    """
    py_test(
        name = name,
        srcs = srcs + ["//tools/pytest:main.py"],
        main = "//tools/pytest:main.py",
        deps = deps + [
            "@pypi//pytest",
            "@pypi//pytest_asyncio",
        ],
        data = data + ["//:pyproject.toml"],
        args = args + ["$(rootpath %s)" % src for src in srcs if src.endswith(".py") and src.split("/")[-1].startswith("test_")],
        **kwargs
    )

def pytest_tests(srcs, deps = [], data = [], helpers = [], **kwargs):
    """One `pytest_test` per `test_<module>.py` in `srcs`, named `<module>_test`.

    Args:
      srcs: test files, one target each.
      deps: shared dependencies of every test.
      data: shared data files.
      helpers: non-test Python files every test may import (conftest.py, fixtures).
      **kwargs: passed to every pytest_test.
    """
    for src in srcs:
        module = src.split("/")[-1][len("test_"):-len(".py")]
        pytest_test(
            name = module + "_test",
            srcs = [src] + helpers,
            deps = deps,
            data = data,
            **kwargs
        )
