#!/usr/bin/env bash
# ruff + mypy over the whole repository without Bazel, as the lint_test targets do
# under Bazel (.ci/run's fallback uses it). Needs ruff and mypy on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# proto/'s Python code (generated, never committed) for mypy to see.
python -m tools.protoc.gen_protos
ruff check .
ruff format --check .
mypy .
# Each policy version alone, its folder as the package base (v1.0.0 is no package name).
for folder in policies/*/v*/; do
  MYPYPATH="$folder" mypy "$folder"*.py "$folder"tests/*.py
done
