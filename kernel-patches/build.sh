#!/bin/sh
# Build the rbuild kernel flavor: Debian's linux-source-6.1 + the series in this directory, a small config
# (tinyconfig + rbuild.config + qemu.config), everything built in (no modules to ship or load).
#   kernel-patches/build.sh [BUILD_DIR]     (default /var/tmp/kbuild; needs linux-source-6.1, gcc, make,
#                                            flex, bison, bc, libelf-dev; about 10-20 min on 2 cores)
# Output: BUILD_DIR/bzImage and BUILD_DIR/config (the full .config used). Re-running reuses the tree and
# only rebuilds what the patches or the config changed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-/var/tmp/kbuild}
tarball=/usr/src/linux-source-6.1.tar.xz
src=$build/linux-source-6.1
jobs=${JOBS:-2}
[ -f "$tarball" ] || { echo "build.sh: $tarball missing: apt-get install linux-source-6.1" >&2; exit 1; }
mkdir -p "$build"
if [ ! -f "$src/.rbuild-series" ]; then
    rm -rf "$src"
    tar -C "$build" -xJf "$tarball"
    for p in "$here"/[0-9][0-9][0-9][0-9]-*.patch; do
        [ -e "$p" ] || continue
        echo "applying $(basename "$p")"
        patch -d "$src" -p1 --forward --batch --quiet < "$p"
    done
    ls "$here"/[0-9][0-9][0-9][0-9]-*.patch 2>/dev/null | xargs -r -n1 basename > "$src/.rbuild-series"
else
    # the tree was patched before: refuse a series that changed since (start again with rm -rf "$src")
    now=$(ls "$here"/[0-9][0-9][0-9][0-9]-*.patch 2>/dev/null | xargs -r -n1 basename)
    [ "$now" = "$(cat "$src/.rbuild-series")" ] || { echo "build.sh: the series changed: rm -rf $src" >&2; exit 1; }
fi
cd "$src"
nice -n 19 make -s ARCH=x86_64 tinyconfig > /dev/null
scripts/kconfig/merge_config.sh -m .config "$here/rbuild.config" "$here/qemu.config" > /dev/null
nice -n 19 make -s olddefconfig
# every symbol the fragments ask for must have survived olddefconfig (a missing dependency drops it)
missing=$(grep -h '^CONFIG_' "$here/rbuild.config" "$here/qemu.config" | while IFS= read -r line; do
    sym=${line%%=*}; val=${line#*=}
    if [ "$val" = n ]; then
        if grep -q "^$sym=" .config; then echo "$line"; fi
    elif ! grep -qx "$line" .config; then echo "$line"; fi
done)
[ -z "$missing" ] || { echo "build.sh: not in the final .config: $missing" >&2; exit 1; }
nice -n 19 make -s -j"$jobs" bzImage
cp arch/x86/boot/bzImage "$build/bzImage"
cp .config "$build/config"
echo "built $build/bzImage ($(make -s kernelrelease))"
