#!/bin/bash
# Set everything up and run the test suite. The suite runs as root so it can create its unprivileged
# builder users; every build inside it runs as one of those users.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$("$here/scripts/setup.sh" | tail -n 1)
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
cd "$here"
set +e
$sudo env RBUILD_BIN="$bin/rbuild" "$bin/python" -m pytest -p no:cacheprovider -q -rs "${@:-tests}"
status=$?
set -e
[ "$status" = 5 ] && { echo "no tests ran"; exit 1; }
exit "$status"
