#!/usr/bin/env bash
# Re-pin the Debian bookworm packages of the engine images' base:
#
#     tools/pin_base_debs.sh            (rewrites builder/private/base_debs.lock.json)
#     tools/pin_base_debs.sh --check    (exit 1 if the pins are no longer the candidates)
#
# Needs a Debian bookworm machine with apt (the pins are the candidates of its apt
# sources: point releases and security updates). Refreshes apt's lists first when run
# as root. Then rebuild and run tools/test: the image tests check the new base.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $(id -u) -eq 0 ]]; then
  apt-get update -qq >&2
else
  echo "pin_base_debs: not root, using apt's current lists (apt-get update skipped)" >&2
fi
exec python3 tools/pin_base_debs.py "$@"
