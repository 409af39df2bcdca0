#!/bin/bash
# Set everything up, build examples/hello (offline: FROM scratch plus Debian's static busybox) and show it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$("$here/scripts/setup.sh" | tail -n 1)
ctx=$(mktemp -d /tmp/rbuild-hello.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp -r "$here/examples/hello/." "$ctx/"
cp /bin/busybox "$ctx/busybox"
chmod -R a+rX "$ctx"
set -x
"$bin/rbuild" build -t hello:latest "$ctx"
"$bin/rbuild" images
"$bin/rbuild" inspect hello:latest
"$bin/rbuild" push hello:latest "oci-archive:$ctx/hello.tar"
