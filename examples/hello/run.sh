#!/bin/sh
# Build the hello image from Debian's static busybox (offline), then a second image FROM it whose RUN
# runs the hello program: its greeting shows in the build output.
set -eu
RBUILD=${RBUILD:-rbuild}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/Containerfile" "$here/hello.sh" "$work/"
cp "${BUSYBOX:-/bin/busybox}" "$work/busybox"
"$RBUILD" build --progress=plain -t hello "$work"
mkdir "$work/check"
printf 'FROM hello\nRUN hello\n' > "$work/check/Containerfile"
"$RBUILD" build --progress=plain --no-cache "$work/check" > "$work/out" 2>&1 || { cat "$work/out"; exit 1; }
cat "$work/out"
grep -q "^Hello from rbuild$" "$work/out"
echo "example hello: ok"
