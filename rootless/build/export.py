"""BuildKit's `--output type=local|tar`: an image's root filesystem as a directory or one tar stream.

Both merge the image's layer directories (`rootfs.copy.materialise`: whiteouts applied, overlay's own
markers dropped) and run inside rbuild's user namespace, so owners are the image's as that namespace
shows them:
- `type=tar` writes the merged tree with the deterministic layer writer: every owner is the image's,
  from the file or from rbuild's `user.rbuild.*` records, whatever the id mapping (the tree is made of
  hard links in the store's scratch space, never copied).
- `type=local` writes real files. With a subordinate id range every owner the range maps is the image's
  (the user reads the tree back through `rbuild unshare`, e.g. `rbuild unshare mkfs.ext4 -d DIR disk.img`);
  without a range every file is the user's own. What could not be kept is counted in `LocalResult`, and
  rbuild's records are removed: they mean nothing outside the store.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

from rootless.errors import RbuildError
from rootless.layer import layers
from rootless.layer.ownership import Ownership
from rootless.store.store import Store

_RECORDS = (layers.XATTR_STAT, layers.XATTR_LSTAT, layers.XATTR_DEV)


@dataclass
class LocalResult:
    """What a `type=local` export could not write as the image has it."""

    owners_lost: int = 0  # files whose image owner this namespace cannot give them (they are the user's)
    devices: int = 0  # device nodes, written as empty regular files (no unprivileged user can make one)


def rootfs_tar(store: Store, diff_ids: list[str], out: BinaryIO) -> None:
    """The image's merged root filesystem as one uncompressed tar on `out`."""
    from rootless.rootfs.copy import materialise

    with store.staging("export-") as tmp:
        tree = os.path.join(tmp, "tree")
        os.mkdir(tree, 0o755)
        materialise(store.layer_dirs(diff_ids), tree, link=True)
        layers.write_tar(tree, out)


def rootfs_dir(store: Store, diff_ids: list[str], dest: str, ownership: Ownership) -> LocalResult:
    """The image's merged root filesystem written as files under `dest` (absent, or an empty directory)."""
    from rootless.rootfs.copy import materialise

    try:
        os.makedirs(dest, 0o755, exist_ok=True)
        if os.listdir(dest):
            raise RbuildError(
                f"--output type=local: {dest} is not empty (files of another export may belong to subordinate "
                f"ids: remove it with `rbuild unshare rm -rf {dest}`)"
            )
    except NotADirectoryError:
        raise RbuildError(f"--output type=local: {dest} is not a directory") from None
    except OSError as e:
        raise RbuildError(f"--output type=local: cannot create {dest}: {e.strerror}") from None
    try:
        materialise(store.layer_dirs(diff_ids), dest)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise RbuildError(f"--output type=local: cannot write {dest}: {e.strerror}{where}") from None
    result = LocalResult()
    _apply_records(dest, ownership, result)
    return result


def _apply_records(top: str, ownership: Ownership, result: LocalResult) -> None:
    """Turn rbuild's records in the written tree into what a plain tree can hold, and drop them."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
                continue  # their owners are in the parent's record, handled with it
            recs = _records(path)
            if not recs:
                continue
            if layers.XATTR_DEV in recs:
                result.devices += 1
            if layers.XATTR_STAT in recs:
                _own(path, *layers.parse_ids(recs[layers.XATTR_STAT]), ownership, result, follow=True)
            if layers.XATTR_LSTAT in recs:
                for child, (uid, gid) in _lstat_owners(path, recs[layers.XATTR_LSTAT]).items():
                    _own(os.path.join(path, child), uid, gid, ownership, result, follow=False)
            for key in recs:
                os.removexattr(path, key, follow_symlinks=False)


def _records(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names if n in _RECORDS}


def _lstat_owners(directory: str, value: bytes) -> dict[str, tuple[int, int]]:
    """The owners a directory's `user.rbuild.lstat` record gives its children (NAME\\0UID:GID:INODE\\0...)."""
    fields = value.split(b"\0")
    out = {}
    for name, rec in zip(fields[0::2], fields[1::2], strict=False):
        parts = rec.split(b":")
        if name and len(parts) == 3 and all(p.isdigit() for p in parts):
            out[os.fsdecode(name)] = (int(parts[0]), int(parts[1]))
    return out


def _own(path: str, uid: int, gid: int, ownership: Ownership, result: LocalResult, follow: bool) -> None:
    if ownership is Ownership.RECORDED:
        result.owners_lost += (uid, gid) != (0, 0)
        return
    try:
        os.chown(path, uid, gid, follow_symlinks=follow)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EPERM):
            raise
        result.owners_lost += 1
