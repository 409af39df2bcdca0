#!/bin/sh
# Build the multi-stage Python app; its self-test step prints what the app serves.
# BASE: a Debian bookworm image (default docker.io/library/debian:bookworm; the tests give oci:LAYOUT).
set -eu
RBUILD=${RBUILD:-rbuild}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$RBUILD" build --progress=plain --build-arg "BASE=${BASE:-docker.io/library/debian:bookworm}" \
    -t python-app "$here" 2>&1 | tee "$work/out"
grep -q '^greeting = "hello from a multi-stage build"$' "$work/out"
"$RBUILD" inspect python-app > "$work/inspect.json"
python3 - "$work/inspect.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))[0]["Config"]
assert config["User"] == "app" and config["Cmd"] == ["python3", "/app/main.py"], config
PY
echo "example python-app: ok"
