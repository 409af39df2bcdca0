#!/bin/sh
# What patch 0001 allows and refuses, tried for real. Run as root on the flavor (the boot job does); the
# mounts are made by the unprivileged user USER (default build, with a subuid range) in its namespace.
# Each case: a file "forged" carrying user.overlay.metacopy and user.overlay.redirect=/secret, pointing
# at a lower file "secret" (0600). Prints one line per case and exits non-zero if one is unexpected.
set -u
user=${1:-build}
d=${TMPDIR:-/var/tmp}/metacopy-security
rm -rf "$d" && mkdir -p "$d" && chmod 755 "$d"
setx() { python3 -c 'import os, sys; os.setxattr(sys.argv[1], sys.argv[2], sys.argv[3].encode())' "$@"; }
forge() { : > "$1" && setx "$1" user.overlay.metacopy "" && setx "$1" user.overlay.redirect /secret; }
layers() {  # $1: case; $2: where the forged file is (upper or lower1); $3: its owner
    c=$d/$1
    mkdir -p "$c/lower1" "$c/lower2" "$c/upper" "$c/work" "$c/m"
    echo "secret of $1" > "$c/lower2/secret" && chmod 600 "$c/lower2/secret"
    forge "$c/$2/forged"
    chown -R "$user:" "$c" && chown "$3" "$c/$2/forged" && chmod 644 "$c/$2/forged"
}
as_user() {  # $1: case, $2: extra mount options; cat the forged file through the overlay
    c=$d/$1
    runuser -u "$user" -- unshare --user --map-root-user --map-auto --mount sh -c '
        mount -t overlay -o "userxattr$2,lowerdir=$1/lower1:$1/lower2,upperdir=$1/upper,workdir=$1/work" ovl "$1/m" \
            2>/dev/null || { echo "mount failed"; exit 0; }
        cat "$1/m/forged"' sh "$c" "$2" 2>&1
}
fail=0
check() {  # $1: case, $2: expected (a word of the output), $3: output
    case "$3" in *"$2"*) r=ok ;; *) r=UNEXPECTED; fail=1 ;; esac
    echo "$r  $1: $(echo "$3" | tr '\n' ' ')"
}
layers mapped upper "$user:"
check "metacopy=on, forged upper file owned by $user (mapped): honoured, data the namespace can read" \
    "secret of mapped" "$(as_user mapped ,metacopy=on)"
layers unmapped-upper upper 4242:4242
check "metacopy=on, forged upper file owned by 4242 (not mapped): refused" \
    "Operation not permitted" "$(as_user unmapped-upper ,metacopy=on)"
layers unmapped-lower lower1 4242:4242
check "metacopy=on, forged lower file owned by 4242 (not mapped): refused" \
    "Operation not permitted" "$(as_user unmapped-lower ,metacopy=on)"
layers default upper "$user:"
check "metacopy off (userxattr's default), forged file owned by $user: refused as before the patch" \
    "Operation not permitted" "$(as_user default "")"
layers privileged upper "$user:"
c=$d/privileged
out=$(unshare --mount sh -c '
    mount -t overlay -o "userxattr,metacopy=on,lowerdir=$1/lower1:$1/lower2,upperdir=$1/upper,workdir=$1/work" ovl \
        "$1/m" 2>/dev/null || { echo "mount failed"; exit 0; }
    cat "$1/m/forged"' sh "$c" 2>&1)
check "metacopy=on with userxattr by real root (initial namespace): mount refused" "mount failed" "$out"
dmesg 2>/dev/null | grep -E "overlayfs: (refusing|conflicting)" | tail -4 | sed 's/^/  dmesg: /'
rm -rf "$d"
exit "$fail"
