#!/bin/sh
# Build the non-root image; check its user, health check and that a RUN ran as that user.
set -eu
RBUILD=${RBUILD:-rbuild}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/Containerfile" "$work/"
cp "${BUSYBOX:-/bin/busybox}" "$work/busybox"
"$RBUILD" build --progress=plain -t nonroot "$work"
"$RBUILD" inspect nonroot > "$work/inspect.json"
python3 - "$work/inspect.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))[0]["Config"]
assert config["User"] == "app", config
check = config["Healthcheck"]
assert check["Test"][0] == "CMD-SHELL" and "wget" in check["Test"][1], check
assert check["Interval"] == 30 * 10**9 and check["Retries"] == 3, check
print("user", config["User"], "healthcheck", check["Test"][1])
PY
echo "example nonroot: ok"
