#!/usr/bin/env bash
# The gateway examples against their projects' schemas (tools/test runs it, so CI does):
#
#     deploy/gateways/schema-check/run.sh
#
#   1. installs the schema packages pinned in package-lock.json (exact versions, integrity
#      hashes) with `npm ci` into a cache folder, once per lock file; Node.js and npm come
#      from Debian (apt-get install as root when missing);
#   2. validates every object in deploy/gateways/*/*.yaml (check.mjs: each schema's rules,
#      plus no field the schema does not know);
#   3. checks the checker: every file in broken/ must be rejected, for the reason its
#      "# expect:" line names.
# Outside Bazel: its offline root has no npm packages. Exit code: 0 all passed, else 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
here=$PWD
root=$(cd ../../.. && pwd)

log() { printf '[gateway-schemas] %s\n' "$*" >&2; }

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    log "ERROR: node and npm are needed (Debian packages nodejs, npm)"
    exit 1
  fi
  log "installing nodejs and npm (apt-get)"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

CACHE_HOME=${POLICY_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/policy-engine}
stamp=$(cat package.json package-lock.json | sha256sum | cut -c1-16)
cache="$CACHE_HOME/gateway-schemas/$stamp"
if [[ ! -f "$cache/.installed" ]]; then
  log "npm ci into $cache"
  rm -rf "$cache"
  mkdir -p "$cache"
  cp package.json package-lock.json "$cache/"
  # --ignore-scripts: no package runs code at install. The packages declare node >= 22;
  # they run on Debian's Node.js 20 (this check is the proof), so the engine warning is
  # expected and hidden (--loglevel=error).
  (cd "$cache" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  touch "$cache/.installed"
fi
# check.mjs must sit beside node_modules (ES modules resolve packages from the script).
cp check.mjs "$cache/check.mjs"

log "node $(node --version); examples:"
examples=("$root"/deploy/gateways/*/*.yaml)
(cd "$root" && node "$cache/check.mjs" "${examples[@]#"$root"/}")
log "the checker rejects each broken example for its stated reason:"
(cd "$root" && node "$cache/check.mjs" --expect-failures deploy/gateways/schema-check/broken/*.yaml)
