#!/usr/bin/env bash
# oci_load (rules_oci offline stand-in): `docker load` (or podman) the image tarball.
set -o errexit -o nounset -o pipefail

if [[ -n "${RUNFILES_DIR:-}" ]]; then runfiles=$RUNFILES_DIR
elif [[ -d "$0.runfiles" ]]; then runfiles="$0.runfiles"
else echo "oci_load: cannot find the runfiles of $0" >&2; exit 1; fi
readonly TARBALL="$runfiles/{{tarball}}"
LOADER="{{loader}}"
if [[ -n "$LOADER" ]]; then LOADER="$runfiles/$LOADER"
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then LOADER=docker
elif command -v podman >/dev/null; then LOADER=podman
else
  echo "oci_load: no container engine (docker/podman) reachable here." >&2
  echo "oci_load: the tarball is ready; load it where one runs:" >&2
  echo "  docker load -i $(readlink -f "$TARBALL")" >&2
  exit 0
fi
exec "$LOADER" load --input "$TARBALL"
