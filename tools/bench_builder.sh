#!/usr/bin/env bash
# tools/bench_builder.sh: time the builder and check that its output is reproducible.
#
#   tools/bench_builder.sh [MANIFEST]     (default: manifests/policy-manifest.yaml)
#
# Prints:
#   * full rebuild: the manifest's generated package and every Bazel output under it
#     (registry, engine runfiles, image layers, validation test) removed first, so all of
#     the engine's own actions run again (the Bazel server, the runtime's outputs and the
#     fetched wheels stay warm: `bazel clean` would also wipe the outputs of everyone else
#     sharing this workspace). Goal <= 60 s.
#   * no-op rebuild: the same command again, nothing changed. Goal <= 5 s.
#   * reproducibility: a second full rebuild yields a byte-identical registry module (and
#     image digest, when the image rules exist); a different manifest (a subset, in /tmp)
#     yields a different registry.
# Exit status 1 if a reproducibility check fails (timings over goal only warn).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
readonly REPO=$PWD
manifest=$(realpath "${1:-manifests/policy-manifest.yaml}")
log=$(mktemp -d /tmp/bench_builder.XXXXXX)
other_package=""
# The throw-away manifest's package goes too (its name depends on the temp folder).
trap 'rm -rf "$log"; [[ -z "$other_package" ]] || rm -rf "$REPO/$other_package" "$REPO/bazel-bin/$other_package"' EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# build MANIFEST LOGFILE: run the builder; print its generated package (generated/x).
build() {
  if ! tools/bazel run //builder:build -- --manifest "$1" >"$2" 2>&1; then
    cat "$2" >&2
    echo "bench_builder: the build of $1 failed" >&2
    exit 2
  fi
  sed -n 's#^builder: generated //\(generated/[^ ]*\)$#\1#p' "$2"
}

clean_package() {
  rm -rf "$REPO/$1" "$REPO/bazel-bin/$1"
}

digest_of() {   # the registry module's sha256, and the image digest if there is one
  local bin="$REPO/bazel-bin/$1"
  echo "registry sha256:$(sha256sum "$bin/engine_registry.py" | cut -d' ' -f1)"
  # The image's manifest digest (output group of :image.digest).
  if [[ -f "$bin/image.json.sha256" ]]; then echo "image $(cat "$bin/image.json.sha256")"; fi
}

echo "bench_builder: manifest $manifest"
package=$(build "$manifest" "$log/warmup.log")   # warm server + runtime outputs

clean_package "$package"
t0=$(now); build "$manifest" "$log/full1.log" >/dev/null; t1=$(now)
full=$(elapsed "$t0" "$t1")
first=$(digest_of "$package")

t0=$(now); build "$manifest" "$log/noop.log" >/dev/null; t1=$(now)
noop=$(elapsed "$t0" "$t1")

clean_package "$package"
t0=$(now); build "$manifest" "$log/full2.log" >/dev/null; t1=$(now)
full2=$(elapsed "$t0" "$t1")
second=$(digest_of "$package")

# A different manifest: the first policy of this one only, from a folder in /tmp.
other_dir="$log/other"; mkdir -p "$other_dir"
python3 - "$manifest" "$other_dir/policy-manifest.yaml" <<'PY'
import os, sys, yaml
src, dst = sys.argv[1], sys.argv[2]
data = yaml.safe_load(open(src))
entry = dict(data["policies"][0])
entry["uri"] = os.path.normpath(os.path.join(os.path.dirname(src), entry["uri"]))
data["policies"] = [entry]
yaml.safe_dump(data, open(dst, "w"))
PY
other_package=$(build "$other_dir/policy-manifest.yaml" "$log/other.log")
other=$(digest_of "$other_package")

status=0
printf '\n%-44s %6s s  (goal <= 60 s)\n' "full rebuild (package outputs removed):" "$full"
printf '%-44s %6s s\n' "full rebuild, second time:" "$full2"
printf '%-44s %6s s  (goal <= 5 s)\n' "no-op rebuild:" "$noop"
awk -v f="$full" -v n="$noop" 'BEGIN { if (f > 60 || n > 5) print "WARNING: over goal" }'
if [[ "$first" == "$second" ]]; then
  echo "reproducible: yes (registry and image digest identical across two full rebuilds)"
  echo "$first" | sed 's/^/  /'
else
  echo "reproducible: NO"; diff <(echo "$first") <(echo "$second") || true; status=1
fi
if [[ "$(echo "$first" | head -n1)" != "$(echo "$other" | head -n1)" ]]; then
  echo "different manifest -> different registry: yes (//$other_package)"
else
  echo "different manifest -> different registry: NO"; status=1
fi
exit "$status"
