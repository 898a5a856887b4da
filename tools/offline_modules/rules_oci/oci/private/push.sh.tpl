#!/usr/bin/env bash
# oci_push (rules_oci offline stand-in): push an OCI layout with crane, then tag it.
# Same command line as rules_oci: [-r|--repository REPO] [-t|--tag TAG]... [crane push flags]
set -o errexit -o nounset -o pipefail

if [[ -n "${RUNFILES_DIR:-}" ]]; then runfiles=$RUNFILES_DIR
elif [[ -d "$0.runfiles" ]]; then runfiles="$0.runfiles"
else echo "oci_push: cannot find the runfiles of $0" >&2; exit 1; fi

readonly CRANE="${CRANE:-crane}"   # rules_oci uses its crane toolchain; here: crane on PATH
readonly IMAGE_DIR="$runfiles/{{image}}"
readonly DIGEST_FILE="$runfiles/{{digest}}"
readonly TAGS_FILE="{{tags}}"
REPOSITORY="{{repository}}"
if [[ -n "{{repository_file}}" ]]; then REPOSITORY=$(tr -d '\n' <"$runfiles/{{repository_file}}"); fi

command -v "$CRANE" >/dev/null || { echo "oci_push: '$CRANE' not found on PATH (apt-get install crane)" >&2; exit 1; }

TAGS=()
ARGS=()
GLOBAL_ARGS=()   # crane flags that `crane tag` needs as well
while (( $# > 0 )); do
  case $1 in
    (-t|--tag) TAGS+=("$2"); shift 2 ;;
    (--tag=*) TAGS+=("${1#--tag=}"); shift ;;
    (-r|--repository) REPOSITORY="$2"; shift 2 ;;
    (--repository=*) REPOSITORY="${1#--repository=}"; shift ;;
    (--image-refs) REFS="$2"; shift 2 ;;
    (--image-refs=*) REFS="${1#--image-refs=}"; shift ;;
    (--insecure) ARGS+=("$1"); GLOBAL_ARGS+=("$1"); shift ;;
    (*) ARGS+=("$1"); shift ;;
  esac
done
[[ -n "$REPOSITORY" ]] || { echo "oci_push: no repository: set 'repository' or pass --repository" >&2; exit 1; }
# The image is pushed by digest, so a tag in the repository would be dropped silently.
if [[ "${REPOSITORY##*/}" == *[:@]* ]]; then
  echo "oci_push: repository '$REPOSITORY' carries a tag or digest; pass the tag with --tag" >&2
  exit 1
fi

DIGEST=$(tr -d '\n' <"$DIGEST_FILE")
if [[ -z "${REFS:-}" ]]; then REFS=$(mktemp); trap 'rm -f "$REFS"' EXIT; fi

"$CRANE" push "$IMAGE_DIR" "$REPOSITORY@$DIGEST" ${ARGS[@]+"${ARGS[@]}"} --image-refs "$REFS"
for tag in ${TAGS[@]+"${TAGS[@]}"}; do
  "$CRANE" tag ${GLOBAL_ARGS[@]+"${GLOBAL_ARGS[@]}"} "$(cat "$REFS")" "$tag"
done
if [[ -n "$TAGS_FILE" ]]; then
  while IFS= read -r tag || [[ -n "$tag" ]]; do
    [[ -z "$tag" ]] || "$CRANE" tag ${GLOBAL_ARGS[@]+"${GLOBAL_ARGS[@]}"} "$(cat "$REFS")" "$tag"
  done <"$runfiles/$TAGS_FILE"
fi
