"""The on-disk layer formats: how an unpacked layer directory marks deletions and opaque directories.

`OVERLAY` ("overlay-userxattr"): layer dirs are kernel-overlay lower dirs in `userxattr` mode, so the
kernel overlay driver mounts them as they are and its upper dir *is* the next layer: a whiteout is a 0:0
character device (mknod of 0:0 is allowed in a user namespace), an opaque directory carries
`user.overlay.opaque` = `y`.

`XATTR` ("rbuild-xattr"): for a store whose filesystem refuses that, above all an overlayfs (a
container's root: overlayfs refuses to create a 0:0 device, which would itself be a whiteout there, and
in `userxattr` mode it refuses `user.overlay.*`). A whiteout is an empty regular file at the name it
hides, marked `user.rbuild.whiteout` = `y`; an opaque directory carries `user.rbuild.opaque` = `y`. Only
the copy rung can build on such layers (kernel overlay would show the marker files).
A whiteout stays at the name it hides (not a `.wh.NAME` file beside it, as in a tar) so every lookup of
a name in a layer is still one lookup, the same code for both formats; the store needs `user.*` xattrs
for its ownership records anyway.

Writers (unpack, the copy driver's diff, COPY's ignore masks) write the format the store records; readers
(the tar writer, normalize, the copy driver's merge) recognise both through `is_whiteout` / `is_opaque`.
The markers are never taken from a tar (`user.rbuild.*` and `user.overlay.*` are dropped at unpack) nor
copied into a tree; a RUN that sets one on its own files hides only what it could have deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from dataclasses import dataclass

WHITEOUT_XATTR = "user.rbuild.whiteout"
OVERLAY_OPAQUE = "user.overlay.opaque"
XATTR_OPAQUE = "user.rbuild.opaque"
MARKERS = (OVERLAY_OPAQUE, XATTR_OPAQUE, WHITEOUT_XATTR)  # the formats' own xattrs: never data


@dataclass(frozen=True)
class LayerFormat:
    name: str
    opaque_xattr: str
    whiteout_xattr: str | None  # None: a whiteout is a 0:0 character device

    def make_whiteout(self, name: str | bytes, dir_fd: int | None = None) -> None:
        if self.whiteout_xattr is None:
            os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=dir_fd)
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        try:
            os.setxattr(fd, self.whiteout_xattr, b"y")
        finally:
            os.close(fd)

    def set_opaque(self, fd: int) -> None:
        """`fd`: an open directory."""
        os.setxattr(fd, self.opaque_xattr, b"y")


OVERLAY = LayerFormat("overlay-userxattr", OVERLAY_OPAQUE, None)
XATTR = LayerFormat("rbuild-xattr", XATTR_OPAQUE, WHITEOUT_XATTR)
FORMATS = {f.name: f for f in (OVERLAY, XATTR)}
FORMAT = OVERLAY  # the format of stores that predate the choice


def is_whiteout(st: os.stat_result, path: str | bytes, dir_fd: int | None = None) -> bool:
    """Whether the entry `path` (relative to `dir_fd` if given; `st` its lstat) is a whiteout, in either format."""
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    if dir_fd is not None:  # getxattr has no dir_fd: the directory's fd through /proc/self/fd
        base = f"/proc/self/fd/{dir_fd}/"
        path = os.fsencode(base) + path if isinstance(path, bytes) else base + path
    try:  # listxattr needs no read permission on the file (a whiteout's mode may be 0)
        return WHITEOUT_XATTR in os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False


def is_opaque(target: int | str | bytes) -> bool:
    """Whether the directory `target` (an open fd or a path, not followed) is opaque, in either format."""
    for name in (OVERLAY_OPAQUE, XATTR_OPAQUE):
        try:
            if isinstance(target, int):
                value = os.getxattr(target, name)
            else:
                value = os.getxattr(target, name, follow_symlinks=False)
        except OSError:
            continue
        if value == b"y":
            return True
    return False


def for_directory(scratch: str) -> LayerFormat:
    """The format a new store on the filesystem of `scratch` (an existing directory of it) takes: `OVERLAY`
    when a 0:0 character device and `user.overlay.opaque` can be made there (tried for real), else `XATTR`."""
    try:
        probe = tempfile.mkdtemp(prefix="probe-format-", dir=scratch)
    except OSError:
        return OVERLAY  # nothing can be written: the store's own error says so later
    try:
        try:
            OVERLAY.make_whiteout(os.path.join(probe, "w"))
            if not stat.S_ISCHR(os.lstat(os.path.join(probe, "w")).st_mode):
                return XATTR
            fd = os.open(probe, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                OVERLAY.set_opaque(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return XATTR  # an overlayfs that took the 0:0 device for a whiteout of its own
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                return XATTR
            raise
        return OVERLAY
    finally:
        with contextlib.suppress(OSError):
            for name in os.listdir(probe):
                os.unlink(os.path.join(probe, name))
            os.rmdir(probe)
