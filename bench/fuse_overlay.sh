#!/bin/bash
# FUSE overlay benchmark: untar a ~200 MB tree into the mount, chown -R it, stat every entry (find), tar
# the merged view back out (a copy10k-like tree walk reading every file), commit the upper (rbuild's layer
# writer), write 1 GiB to one file; then, in a second mount over a Debian base, apt-get install and commit.
# On kernel overlay (userxattr), Debian's fuse-overlayfs and rbuild-fuse-overlay, each in its own
# `unshare -Urmpf` as the user running this. Prints "fs step seconds" lines, REPS alternating rounds.
#   [KINDS="kernel fuse-overlayfs rbuild"] [BENCH_DIR=/dev/shm/x] [DEBIAN_ROOTFS=dir] [APT_PKGS="..."] \
#       bench/fuse_overlay.sh HELPER [REPS]
# HELPER: an installed rbuild-fuse-overlay (rootless/libexec/ of a venv: that venv's python runs the commit).
# BENCH_DIR on a tmpfs (/dev/shm) takes the disk out of the numbers. DEBIAN_ROOTFS (default: bench/run.py's
# debootstrap cache, /var/cache/rbuild-bench/debian-bookworm-minbase/rootfs) is the apt mount's lower layer;
# without it the apt steps are left out. The packages are downloaded once (untimed, needs deb.debian.org),
# so `apt` times unpacking and configuring them through the overlay, not the network.
# As root it runs as root in the user namespace; /dev/fuse must be open to the user otherwise.
set -euo pipefail
helper=$(realpath "$1"); reps=${2:-3}
base=${BENCH_DIR:-/var/tmp/rbuild-fuse-bench}
rootfs=${DEBIAN_ROOTFS:-/var/cache/rbuild-bench/debian-bookworm-minbase/rootfs}
pkgs=${APT_PKGS:-python3 perl}
venv=$(cd "$(dirname "$helper")/../../../../.." && pwd)
py=${PYTHON:-$venv/bin/python}
mkdir -p "$base"
[ -f "$base/tree.tar" ] || tar -cf "$base/tree.tar" -C / usr/include usr/lib/python3.11 usr/lib/python3 2>/dev/null
[ -d "$rootfs/etc/apt" ] || rootfs=""

# The mount of one kind over lower $2 with upper $3 at $4 (work dir $3.w); the helper's pid in $b/pid.
MOUNT='mnt() {
  mkdir -p "$3" "$3.w" "$4"
  case $1 in
    kernel) mount -t overlay overlay -o "userxattr,lowerdir=$2,upperdir=$3,workdir=$3.w" "$4" ;;
    fuse-overlayfs) /usr/bin/fuse-overlayfs -o "lowerdir=$2,upperdir=$3,workdir=$3.w" "$4" 2>/dev/null ;;
    rbuild) rm -f "$4.ready"; exec 4>"$4.ready"; "$helper" --ready-fd 4 -o "lowerdir=$2,upperdir=$3,workdir=$3.w" "$4" &
            exec 4>&-; while [ ! -s "$4.ready" ]; do sleep 0.01; done ;;
  esac
}
t() { local s e; s=$(date +%s.%N); "${@:2}"; e=$(date +%s.%N); echo "$kind $1 $(echo "$e - $s" | bc)"; }
commit() { "$py" -c "import sys; from rootless.layer.layers import write_tar; write_tar(sys.argv[1], None)" "$1"; }
# apt in a chroot of the mount: the lists and .debs from $base/apt, DNS from the host
chroot_apt() {
  local m=$1; shift
  mkdir -p "$base/apt/lists/partial" "$base/apt/archives/partial"
  local n; for n in null zero full random urandom; do mount --bind "/dev/$n" "$m/dev/$n"; done
  mount -t proc proc "$m/proc"
  mount --bind "$base/apt/lists" "$m/var/lib/apt/lists"; mount --bind "$base/apt/archives" "$m/var/cache/apt/archives"
  touch "$m/etc/resolv.conf" 2>/dev/null || true; mount --bind /etc/resolv.conf "$m/etc/resolv.conf"
  chroot "$m" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    apt-get -q -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0 "$@" >"$m.apt-log" 2>&1 || { cat "$m.apt-log" >&2; exit 1; }
  for n in null zero full random urandom; do umount "$m/dev/$n"; done
  umount "$m/proc" "$m/var/lib/apt/lists" "$m/var/cache/apt/archives" "$m/etc/resolv.conf"
}'

if [ -n "$rootfs" ] && [ ! -f "$base/apt/done" ]; then  # download once, untimed, through kernel overlay
  unshare -Urmpf bash -s "$helper" "$base" "$rootfs" "$py" "$pkgs" <<INNER
set -eu
helper=\$1; base=\$2; rootfs=\$3; py=\$4; pkgs=\$5; b=\$base/fetch; kind=kernel
$MOUNT
rm -rf "\$b"; mnt kernel "\$rootfs" "\$b/u" "\$b/m"
chroot_apt "\$b/m" update
chroot_apt "\$b/m" install -y --no-install-recommends --download-only \$pkgs
umount "\$b/m"; rm -rf "\$b"; touch "\$base/apt/done"
INNER
fi

one() {
  unshare -Urmpf bash -s "$1" "$helper" "$base" "$rootfs" "$py" "$pkgs" <<INNER
set -eu
kind=\$1; helper=\$2; base=\$3; rootfs=\$4; py=\$5; pkgs=\$6; b=\$base/run-\$1
$MOUNT
rm -rf "\$b"; mkdir -p "\$b/l/etc"; echo base > "\$b/l/etc/hostname"
mnt "\$kind" "\$b/l" "\$b/u" "\$b/m"
t untar tar -C "\$b/m" -xf "\$base/tree.tar"
t chown-R chown -R 0:0 "\$b/m"
t find-stat sh -c "find '\$b/m' -printf '%s %u %m\\\\n' | wc -l >/dev/null"
t tar-out sh -c "tar -C '\$b/m' -cf - . | wc -c >/dev/null"
t commit commit "\$b/u"
t write-1g dd if=/dev/zero of="\$b/m/big" bs=1M count=1024 status=none
umount "\$b/m"; wait
if [ -n "\$rootfs" ]; then
  mnt "\$kind" "\$rootfs" "\$b/au" "\$b/am"
  t apt chroot_apt "\$b/am" install -y --no-install-recommends \$pkgs
  umount "\$b/am"; wait
  t apt-commit commit "\$b/au"
fi
rm -rf "\$b"
INNER
}
for _ in $(seq "$reps"); do
    for kind in ${KINDS:-kernel fuse-overlayfs rbuild}; do one "$kind"; done
done
