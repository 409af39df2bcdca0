#!/bin/sh
# Two builds into two empty stores, with --no-cache: one manifest digest.
set -eu
RBUILD=${RBUILD:-rbuild}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$here/Containerfile" "$here/app" "$work/"
cp "${BUSYBOX:-/bin/busybox}" "$work/busybox"
export SOURCE_DATE_EPOCH=1700000000
for n in 1 2; do
    "$RBUILD" --root "$work/store$n" build -q --no-cache -t repro "$work" > "$work/id$n"
    "$RBUILD" --root "$work/store$n" push -q --digestfile "$work/digest$n" repro "oci:$work/out$n:latest"
    sleep 1  # a second later: time must not leak in
done
echo "build 1: $(cat "$work/digest1")"
echo "build 2: $(cat "$work/digest2")"
cmp "$work/id1" "$work/id2"
cmp "$work/digest1" "$work/digest2"
echo "example reproducible: ok"
