#!/bin/sh
# Build the bootable rbuild OS image with `rbuild build` and turn it into disks, all without privilege.
#   examples/bootable/mkdisk.sh OUTDIR
# Run as an unprivileged user with a subuid range. Environment:
#   BASE     the Debian base (default docker.io/library/debian:bookworm; oci:DIR for a local one)
#   KERNEL   the flavor's bzImage (default /var/tmp/kbuild/bzImage from kernel-patches/build.sh)
#   KCONFIG  its .config (default next to it); PYTHON: a python with pip (default python3)
#   SIZE     the root disk's size (default 3G)
# Output in OUTDIR: root.img (ext4 of the image's root file system, replaced on every update),
# state.img (ext4 for /var, made once and carried), vmlinuz (for qemu -kernel), layout/ (the OCI image).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:?usage: mkdisk.sh OUTDIR}
base=${BASE:-docker.io/library/debian:bookworm}
kernel=${KERNEL:-/var/tmp/kbuild/bzImage}
kconfig=${KCONFIG:-$(dirname "$kernel")/config}
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
ctx=$out/context
rm -rf "$ctx" "$out/layout" "$out/rootfs"
mkdir -p "$ctx/kernel" "$ctx/wheels"
cp "$here/Containerfile" "$here/init" "$here/boot-job" "$repo/kernel-patches/sysctl.conf" \
   "$repo/kernel-patches/metacopy-bench.sh" "$repo/kernel-patches/metacopy-security.sh" "$ctx/"
cp "$kernel" "$ctx/kernel/vmlinuz"
cp "$kconfig" "$ctx/kernel/config"
# rbuild and its dependencies as wheels, from a copy of the checkout (no .git, no build leftovers)
src=$out/src
rm -rf "$src" && mkdir -p "$src"
tar -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=./build -cf - pyproject.toml setup.py README.md \
    rootless csrc | tar -C "$src" -xf -
"$python" -m pip wheel -q --disable-pip-version-check -w "$ctx/wheels" "$src" >&2
rm -rf "$src"
rbuild build -q --build-arg "BASE=$base" -t localhost/rbuild-os "$ctx"
rbuild push localhost/rbuild-os "oci:$out/layout:os"
# Unpack and make the file system inside a user namespace holding the subuid range: the files get
# their image owners (0 is us, 1.. the range), and mkfs.ext4 -d records those in-namespace ids.
unshare --user --map-root-user --map-auto sh -c '
    set -e
    umoci raw unpack --image "$1/layout:os" "$1/rootfs"
    rm -f "$1/root.img"
    mkfs.ext4 -q -L rbuild-root -d "$1/rootfs" "$1/root.img" "$2"
    rm -rf "$1/rootfs"' sh "$out" "${SIZE:-3G}"
[ -e "$out/state.img" ] || mkfs.ext4 -q -L rbuild-state "$out/state.img" 8G
cp "$kernel" "$out/vmlinuz"
echo "$out/root.img $out/state.img $out/vmlinuz"
