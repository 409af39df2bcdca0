#!/bin/bash
# Install what rbuild needs on Debian 12 and put rbuild into a world-readable virtualenv.
# Works as root and as a user with sudo. Prints the venv's bin directory on the last line.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${RBUILD_VENV:-/opt/rbuild/env}
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
# debootstrap: the self-hosting test (a Debian base for rbuild's own image)
# tmux: the terminal the live progress view is tested in (tests/test_progress_tty.py); zsh, fish: completion tests
# libseccomp2: the RUN sandbox's filter; python3-seccomp: tests/envsim.py's filters (Debian's python3);
# libc6-dev: static test programs the sandbox tests compile;
# libfuse3-dev, fuse3, pkg-config, make: the optional FUSE overlay helper (csrc/) and its tests
# linux-source-6.1, patch: the kernel flavor's series must apply to the pinned source (tests/test_kernel_patches.py);
# e2fsprogs: the bootable example's disk (mkfs.ext4 -d) and its check (debugfs)
packages="linux-source-6.1 patch e2fsprogs debootstrap tmux zsh fish uidmap libfuse3-dev fuse3 pkg-config make busybox-static docker-registry buildah skopeo umoci python3-venv python3-dev gcc libc6-dev zstd util-linux openssl git libseccomp2 python3-seccomp"
missing=""
for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q $missing >&2
fi
# Debian's python (the one on PATH may live under /root, unreadable for other users)
if [ ! -x "$venv/bin/python" ]; then
    $sudo mkdir -p "$venv"
    $sudo /usr/bin/python3 -m venv "$venv" >&2
fi
# build from a world-readable copy: the checkout may live where the builder user cannot read
src=$(mktemp -d /tmp/rbuild-src.XXXXXX)
trap '$sudo rm -rf "$src"' EXIT
tar -C "$here" --exclude=.git --exclude='*.egg-info' --exclude=./build -cf - . | tar -C "$src" -xf -
chmod -R a+rX "$src"
$sudo "$venv/bin/pip" install -q --disable-pip-version-check --upgrade "$src[test]" >&2
$sudo chmod -R a+rX "$venv"
echo "$venv/bin"
