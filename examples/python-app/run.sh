#!/bin/sh
# Build the multi-stage Python app; its self-test step prints what the app serves.
# BASE: a Debian bookworm image (default docker.io/library/debian:bookworm; the tests give oci:LAYOUT).
set -eu
RBUILD=${RBUILD:-rbuild}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# CA_BUNDLE: a CA bundle for pip, where PyPI is reached through a TLS-intercepting proxy
set -- --build-arg "BASE=${BASE:-docker.io/library/debian:bookworm}"
[ -z "${CA_BUNDLE:-}" ] || set -- "$@" --secret "id=ca-bundle,src=$CA_BUNDLE"
"$RBUILD" build --progress=plain "$@" -t python-app "$here" > "$work/out" 2>&1 || { cat "$work/out"; exit 1; }
cat "$work/out"
grep -q '^greeting = "hello from a multi-stage build"$' "$work/out"
"$RBUILD" inspect python-app > "$work/inspect.json"
python3 - "$work/inspect.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))[0]["Config"]
assert config["User"] == "app" and config["Cmd"] == ["python3", "/app/main.py"], config
PY
echo "example python-app: ok"
