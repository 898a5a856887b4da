#!/usr/bin/env bash
# redis-image.sh [REDIS_SERVER]: build localhost/redis:local, the Redis of the local overlay:
# Debian's redis-server binary (default: $REDIS_SERVER, else `redis-server` on PATH; run
# `apt-get install redis-server`) and the shared libraries `ldd` finds for it, in an
# otherwise empty root file system (`podman import`; no shell, no package manager).
set -euo pipefail
binary=${1:-${REDIS_SERVER:-$(command -v redis-server || true)}}
[[ -n "$binary" && -x "$binary" ]] || { echo "$0: no redis-server (apt-get install redis-server, or pass its path)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/lib/x86_64-linux-gnu" "$root/lib64"
cp -L "$binary" "$root/usr/bin/redis-server"   # Debian's is a link to redis-check-rdb
ldd "$binary" | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | while read -r lib; do
  case $lib in
    */ld-linux*) cp -L "$lib" "$root/lib64/" ;;
    *) cp -L "$lib" "$root/lib/x86_64-linux-gnu/" ;;
  esac
done
chmod -R u=rwX,go=rX "$root"   # mktemp made it 0700: uid 65532 must enter it
tar -C "$root" --owner=0 --group=0 --numeric-owner -c . | podman import --quiet - localhost/redis:local
