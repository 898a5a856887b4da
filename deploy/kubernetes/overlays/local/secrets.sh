#!/usr/bin/env bash
# secrets.sh PKI_DIR ADMIN_TOKENS_FILE OUT_DIR: one file per Secret the manifests mount,
# OUT_DIR/<secret name>.yaml, for `podman secret create NAME FILE` (docs/operators/kubernetes.md).
#   PKI_DIR: `python3 -m engine.tls_testing PKI_DIR --node-id engine` writes a throw-away PKI
#            (engine/, controlplane/, node-engine/, each tls.crt tls.key ca.crt)
#   ADMIN_TOKENS_FILE: "name role token" lines (docs/operators/xds.md)
# The files are in the form podman 4.3 reads for Secret volumes: a Secret whose `data`
# values are the files' contents as they are, NOT base64 (podman 4.3 writes `data` values
# into the mounted files verbatim, and `podman kube play` of a proper Secret leaves them
# base64-encoded there; it ignores `stringData`). Not for a cluster: there, make Secrets
# with the same names and keys with cert-manager, kubectl or your secret store.
set -euo pipefail
[[ $# -eq 3 ]] || { echo "usage: $0 PKI_DIR ADMIN_TOKENS_FILE OUT_DIR" >&2; exit 2; }
pki=$1 tokens=$2 out=$3
mkdir -p "$out"
secret() {  # name type key=file...
  local name=$1 type=$2 pair file
  shift 2
  {
    printf 'apiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\ntype: %s\ndata:\n' "$name" "$type"
    for pair in "$@"; do
      file=${pair#*=}
      [[ -s "$file" ]] || { echo "$0: $file: missing or empty" >&2; exit 1; }
      printf '  %s: |\n' "${pair%%=*}"
      sed 's/^/    /' "$file"
    done
  } >"$out/$name.yaml"
  chmod 600 "$out/$name.yaml"
}
tls() { secret "$1" kubernetes.io/tls "tls.crt=$2/tls.crt" "tls.key=$2/tls.key" "ca.crt=$2/ca.crt"; }
tls policy-engine-tls "$pki/engine"
tls policy-engine-xds-client "$pki/node-engine"
tls policy-engine-controlplane-tls "$pki/controlplane"
secret policy-engine-admin-tokens Opaque "tokens=$tokens"
