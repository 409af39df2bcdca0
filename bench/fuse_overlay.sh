#!/bin/bash
# FUSE overlay benchmark: untar a ~200 MB tree into the mount, chown -R it, stat every entry (find), tar
# the merged view back out (a copy10k-like tree walk reading every file), write 1 GiB to one file; on
# kernel overlay (userxattr), Debian's fuse-overlayfs and rbuild-fuse-overlay, each in its own
# `unshare -Urm` as the user running this. Prints "fs step seconds" lines, REPS alternating rounds.
#   [KINDS="kernel fuse-overlayfs rbuild"] [BENCH_DIR=/dev/shm/x] bench/fuse_overlay.sh HELPER [REPS]
# (HELPER: rbuild-fuse-overlay). BENCH_DIR on a tmpfs (/dev/shm) takes the disk out of the numbers.
# As root it runs as root in the user namespace; /dev/fuse must be open to the user otherwise.
set -euo pipefail
helper=$(realpath "$1"); reps=${2:-3}
base=${BENCH_DIR:-/var/tmp/rbuild-fuse-bench}
mkdir -p "$base"
[ -f "$base/tree.tar" ] || tar -cf "$base/tree.tar" -C / usr/include usr/lib/python3.11 usr/lib/python3 2>/dev/null
one() {
    unshare -Urm bash -s "$1" "$helper" "$base" <<'INNER'
set -eu
kind=$1; helper=$2; b=$3/run-$1
rm -rf "$b"; mkdir -p "$b/l/etc" "$b/u" "$b/w" "$b/m"; echo base > "$b/l/etc/hostname"
case $kind in
  kernel) mount -t overlay overlay -o "userxattr,lowerdir=$b/l,upperdir=$b/u,workdir=$b/w" "$b/m" ;;
  fuse-overlayfs) /usr/bin/fuse-overlayfs -o "lowerdir=$b/l,upperdir=$b/u,workdir=$b/w" "$b/m" ;;
  rbuild) exec 4>"$b/ready"; "$helper" --ready-fd 4 -o "lowerdir=$b/l,upperdir=$b/u,workdir=$b/w" "$b/m" & exec 4>&-
          while [ ! -s "$b/ready" ]; do sleep 0.01; done ;;
esac
t() { local s e; s=$(date +%s.%N); "${@:2}"; e=$(date +%s.%N); echo "$kind $1 $(echo "$e - $s" | bc)"; }
t untar tar -C "$b/m" -xf "$3/tree.tar"
t chown-R chown -R 0:0 "$b/m"
t find-stat sh -c "find '$b/m' -printf '%s %u %m\\n' | wc -l >/dev/null"
t tar-out sh -c "tar -C '$b/m' -cf - . | wc -c >/dev/null"
t write-1g dd if=/dev/zero of="$b/m/big" bs=1M count=1024 status=none
umount "$b/m"; wait
rm -rf "$b"
INNER
}
for _ in $(seq "$reps"); do
    for kind in ${KINDS:-kernel fuse-overlayfs rbuild}; do one "$kind"; done
done
