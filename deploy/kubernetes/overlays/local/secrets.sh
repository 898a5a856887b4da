#!/usr/bin/env bash
# secrets.sh PKI_DIR ADMIN_TOKENS_FILE > secrets.yaml: the Secrets the manifests mount, for
# `podman kube play secrets.yaml` (before the manifests; `podman kube down` removes them).
#   PKI_DIR: `python3 -m engine.tls_testing PKI_DIR --node-id engine` writes a throw-away PKI
#            (engine/, controlplane/, node-engine/, each tls.crt tls.key ca.crt)
#   ADMIN_TOKENS_FILE: "name role token" lines (docs/operators/xds.md)
# Written as `stringData`: podman 4.3 puts a played Secret's `data` values into the mounted
# files still base64-encoded (a cluster decodes them). In a cluster, make these Secrets with
# cert-manager, kubectl or your secret store instead (same names and keys), plus
# policy-engine-redis (key url), which this overlay replaces by a plain value.
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 PKI_DIR ADMIN_TOKENS_FILE" >&2; exit 2; }
pki=$1 tokens=$2
secret() {  # name type key=file...
  local name=$1 type=$2 pair file
  shift 2
  printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\ntype: %s\nstringData:\n' "$name" "$type"
  for pair in "$@"; do
    file=${pair#*=}
    [[ -s "$file" ]] || { echo "$0: $file: missing or empty" >&2; exit 1; }
    printf '  %s: |\n' "${pair%%=*}"
    sed 's/^/    /' "$file"
  done
}
tls() { secret "$1" kubernetes.io/tls "tls.crt=$2/tls.crt" "tls.key=$2/tls.key" "ca.crt=$2/ca.crt"; }
tls policy-engine-tls "$pki/engine"
tls policy-engine-xds-client "$pki/node-engine"
tls policy-engine-controlplane-tls "$pki/controlplane"
secret policy-engine-admin-tokens Opaque "tokens=$tokens"
