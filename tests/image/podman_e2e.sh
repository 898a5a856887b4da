#!/usr/bin/env bash
# The engine image in a real container, and deploy/kubernetes's local overlay with
# `podman kube play`: //tests/image:podman_test (test_podman.py, test_kube.py), run on the host.
#
#     tests/image/podman_e2e.sh        (tools/test runs it, so CI does)
#
# Bazel's offline root is a chroot without cgroups or a container runtime, so podman
# cannot run inside a Bazel test there. This script
#   1. makes sure the host has podman, runc and catatonit (the pods' infra process;
#      apt-get install as root when missing), and Debian's docker-registry and redis-server
#      (each unpacked into a cache folder: no daemon, no system user);
#   2. checks that podman can run at all here (private store and config in a temp folder);
#      if it cannot, it says why LOUDLY and exits 0 - the only case the test is skipped;
#   3. builds the test with tools/bazel (`bazel run --script_path`: build, do not run) and
#      runs the script Bazel wrote on the host, with POLICY_ENGINE_PODMAN_E2E=1.
# Exit code: the test's (0 passed), or 0 after the loud skip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

log() { printf '[podman_e2e] %s\n' "$*" >&2; }
skip_loudly() {
  cat >&2 <<MSG
################################################################################
#  PODMAN TEST SKIPPED: podman cannot run containers on this machine.
#  Reason: $1
#  The image was NOT run in a container. Fix the reason above to run it
#  (tests/image/podman_e2e.sh; see docs/operators/deployment.md).
################################################################################
MSG
  exit 0
}

CACHE_HOME=${POLICY_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/policy-engine}
work=$(mktemp -d "${TMPDIR:-/tmp}/podman-e2e.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- 1. host tools -----------------------------------------------------------
missing=()
for tool in podman runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[[ -x /usr/libexec/podman/catatonit || -x /usr/bin/catatonit ]] || missing+=(catatonit)
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    skip_loudly "${missing[*]} not installed, and this is not a root Debian shell that could apt-get install them"
  fi
  log "installing ${missing[*]} (apt-get)"
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$work/apt.log" 2>&1; then
    skip_loudly "apt-get install ${missing[*]} failed: $(tail -n 3 "$work/apt.log" | tr '\n' ' ')"
  fi
fi
registry=${DOCKER_REGISTRY:-}
if [[ -z "$registry" ]]; then
  registry=/usr/bin/docker-registry
  if [[ ! -x "$registry" ]]; then
    tools_dir="$CACHE_HOME/host-tools"
    registry="$tools_dir/usr/bin/docker-registry"
    if [[ ! -x "$registry" ]]; then
      log "unpacking Debian's docker-registry into $tools_dir (apt-get download; no daemon)"
      mkdir -p "$tools_dir"
      (cd "$work" && apt-get download docker-registry >"$work/download.log" 2>&1 && dpkg-deb -x docker-registry_*.deb "$tools_dir") \
        || { log "ERROR: could not fetch docker-registry: $(tail -n 3 "$work/download.log")"; exit 1; }
    fi
  fi
fi

# redis-server for the local overlay's Redis pod (test_kube.py builds its image from the
# binary and the libraries it links: deploy/kubernetes/overlays/local/redis-image.sh).
redis_server=${REDIS_SERVER:-$(command -v redis-server || true)}
redis_libs=""
if [[ -z "$redis_server" ]]; then
  redis_root="$CACHE_HOME/host-tools/redis/root"
  redis_server="$redis_root/usr/bin/redis-server"
  redis_libs="$redis_root/usr/lib/x86_64-linux-gnu"
  if [[ ! -x "$redis_server" ]]; then
    log "unpacking Debian's redis-server into $redis_root (apt-get download; no daemon)"
    mkdir -p "$redis_root"
    mkdir -p "$work/redis-debs"
    (cd "$work/redis-debs" && apt-get download redis-server redis-tools liblzf1 libjemalloc2 >"$work/redis.log" 2>&1 \
      && for deb in ./*.deb; do dpkg-deb -x "$deb" "$redis_root"; done) \
      || { log "ERROR: could not fetch redis-server: $(tail -n 3 "$work/redis.log")"; exit 1; }
  fi
fi

# --- 2. can podman run a container here at all? -------------------------------
# The same private setup the test uses (tests/image/podman.py): nothing under /etc.
cat >"$work/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
CONF
probe=(podman --root "$work/root" --runroot "$work/runroot" --storage-driver vfs
  --cgroup-manager cgroupfs --runtime runc --events-backend file)
if ! CONTAINERS_CONF="$work/containers.conf" "${probe[@]}" info >"$work/info.log" 2>&1; then
  skip_loudly "'podman info' failed: $(tail -n 3 "$work/info.log" | tr '\n' ' ')"
fi
log "podman $(podman --version | awk '{print $3}') with runc $(runc --version | awk 'NR==1{print $3}') can run here"

# --- 3. build with Bazel, run on the host --------------------------------------
# `bazel run --script_path` builds the test and writes how Bazel would start it. That
# script cannot run here as it is: its test wrapper and the py_binary launcher's
# interpreter wrapper live in Bazel's install base inside the offline root. So we start
# the test's main file with this machine's Python 3.11 and the PYTHONPATH the launcher
# would compute (read from the launcher, as the image's entrypoint is:
# builder/private/image_metadata.py), in the runfiles tree, with the target's `env`.
script="$work/podman_test.sh"
tools/bazel run --script_path="$script" //tests/image:podman_test
execroot=$(sed -n 's/^cd \(.*\) \&\& \\$/\1/p' "$script")
runfiles="$execroot/$(sed -n 's/^ *RUNFILES_DIR=\(.*\) \\$/\1/p' "$script")"
launcher="${runfiles%.runfiles}"
[[ -d "$runfiles/_main" && -f "$launcher" ]] || { log "ERROR: no runfiles tree at $runfiles"; exit 1; }
python=$(command -v python3.11) || { log "ERROR: python3.11 is not on PATH"; exit 1; }
pythonpath=$("$python" -c '
import sys
sys.path.insert(0, "builder/private")
from image_metadata import python_entry
print(python_entry(open(sys.argv[1]).read(), sys.argv[2]).env["PYTHONPATH"])' "$launcher" "$runfiles")
target_env=()
while IFS= read -r line; do target_env+=("$line"); done < <(sed -n 's/^ *\(\(IMAGE\|KUSTOMIZE\)[A-Z_]*=.*\) \\$/\1/p' "$script")
log "running //tests/image:podman_test on the host"
cd "$runfiles/_main"
env "${target_env[@]}" PYTHONPATH="$pythonpath" PYTHONSAFEPATH=1 RUNFILES_DIR="$runfiles" \
  POLICY_ENGINE_PODMAN_E2E=1 DOCKER_REGISTRY="$registry" \
  REDIS_SERVER="$redis_server" REDIS_LIBRARY_PATH="$redis_libs" \
  "$python" tools/pytest/main.py tests/image/test_podman.py tests/image/test_kube.py "$@"
