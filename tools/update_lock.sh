#!/usr/bin/env bash
# Regenerate requirements_lock.txt (exact pins + hashes, transitive) from requirements.in.
# Uses pip-tools in a throw-away venv made from the host's Python 3.11; pip uses
# its own configured index.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3.11 -m venv "$venv"
"$venv/bin/pip" install --quiet pip-tools
# --strip-extras: pip.parse wants plain pins; --allow-unsafe: pin setuptools/pip too if needed.
"$venv/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe \
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
  --output-file requirements_lock.txt requirements.in
echo "requirements_lock.txt updated"
