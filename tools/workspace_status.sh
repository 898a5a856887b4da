#!/usr/bin/env bash
# Stamping values for --config=release (bazel's --workspace_status_command).
# STABLE_* keys invalidate stamped outputs when they change; the others do not.
set -euo pipefail
rev=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$([[ -n "$(git status --porcelain 2>/dev/null)" ]] && echo -dirty || true)
echo "STABLE_SOURCE_REVISION ${rev}${dirty}"
echo "BUILD_TIMESTAMP_SOURCE_DATE_EPOCH ${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
