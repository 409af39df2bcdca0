#!/bin/sh
# Build twice, the second time with --no-cache: apt finds gcc in the cache mount ("Need to get 0 B").
# BASE: a Debian bookworm image (default docker.io/library/debian:bookworm; the tests give oci:LAYOUT).
set -eu
RBUILD=${RBUILD:-rbuild}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
base=${BASE:-docker.io/library/debian:bookworm}
"$RBUILD" build --progress=plain --build-arg "BASE=$base" -t c-hello "$here" > "$work/first" 2>&1 || { cat "$work/first"; exit 1; }
cat "$work/first"
grep -q "^hello from C, compiled in a build step$" "$work/first"
"$RBUILD" build --progress=plain --no-cache --build-arg "BASE=$base" -t c-hello "$here" > "$work/second" 2>&1 || { cat "$work/second"; exit 1; }
cat "$work/second"
grep -q "Need to get 0 B" "$work/second"
echo "example c-cache-mount: ok"
