#!/bin/sh
# `chown -R` of N files (default 50,000 of 4 KiB) on an overlay mounted the way rbuild mounts a RUN step
# (userxattr, in a user namespace with the subuid range): as rbuild mounts it (off), with `volatile` (no
# fsync per copied-up file) and with metacopy=on (no data copied). Run as an
# unprivileged user with a subuid range. metacopy=on needs the flavor's patch 0001: on other kernels
# that mount is refused and the script says so.
#   metacopy-bench.sh [DIR] [N] [KIB]      (MODES="off volatile on" by default: which mounts to time)
set -eu
dir=${1:-${TMPDIR:-/var/tmp}/metacopy-bench}
n=${2:-50000}
kib=${3:-4}
# the upper layers hold files of subordinate ids: only the namespace can remove them
ns() { unshare --user --map-root-user --map-auto "$@"; }
ns rm -rf "$dir" && mkdir -p "$dir/lower/data"
python3 - "$dir/lower/data" "$n" "$kib" <<'PY'
import os, sys
root, n, kib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = os.urandom(kib * 1024)
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:03d}")
    if i % 1000 == 0:
        os.mkdir(d)
    with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
        f.write(block)
PY
sync
echo "kernel $(uname -r): chown -R of $n files of $kib KiB on overlay (userxattr, user namespace)"
for mode in ${MODES:-off volatile on}; do
    ns rm -rf "$dir/upper" "$dir/work" "$dir/merged" && mkdir "$dir/upper" "$dir/work" "$dir/merged"
    opts="userxattr,lowerdir=$dir/lower,upperdir=$dir/upper,workdir=$dir/work"
    # volatile: no fsync of each copied-up file (upstream, any kernel since 5.10), the data still copied
    case $mode in
        on) opts="$opts,metacopy=on" label=metacopy=on ;;
        volatile) opts="$opts,volatile" label="metacopy=off,volatile" ;;
        *) label=metacopy=off ;;
    esac
    unshare --user --map-root-user --map-auto --mount sh -c '
        if ! mount -t overlay -o "$1" bench "$2" 2>/dev/null; then echo "$3: mount refused by this kernel"; exit 0; fi
        s=$(date +%s%N); chown -R 1000:1000 "$2/data"; sync; e=$(date +%s%N)
        # the merged view still reads the lower data, owned as asked
        test "$(stat -c %u "$2/data/d000/f000000")" = 1000 && cmp -s "$2/data/d000/f000000" "$4/data/d000/f000000"
        echo "$3: $(( (e - s) / 1000000 )) ms, upper layer $(du -sk "$5" | cut -f1) KiB"
        umount "$2"' sh "$opts" "$dir/merged" "$label" "$dir/lower" "$dir/upper"
done
ns rm -rf "$dir"
