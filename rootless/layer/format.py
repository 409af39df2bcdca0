"""The on-disk layer format: how an unpacked layer directory marks deletions and opaque directories.

Layer dirs are kernel-overlay lower dirs in `userxattr` mode, so the kernel overlay driver mounts them
as they are and its upper dir *is* the next layer: a whiteout is a 0:0 character device (mknod of 0:0 is
allowed in a user namespace), an opaque directory carries `user.overlay.opaque` = `y`. Every reader and
writer of layer dirs (unpack, normalize, the tar writer, COPY's ignore masks, the rootfs drivers) asks
`FORMAT` instead of knowing this. The store records the format's name; a driver that cannot produce it
(a FUSE overlay where 0:0 mknod is refused) would add a second `LayerFormat` and be chosen with it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerFormat:
    name: str
    opaque_xattr: str

    def is_whiteout(self, st: os.stat_result) -> bool:
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    def make_whiteout(self, name: str | bytes, dir_fd: int | None = None) -> None:
        os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=dir_fd)

    def is_opaque(self, fd: int) -> bool:
        """`fd`: an open directory."""
        try:
            return os.getxattr(fd, self.opaque_xattr) == b"y"
        except OSError:
            return False

    def set_opaque(self, fd: int) -> None:
        os.setxattr(fd, self.opaque_xattr, b"y")


FORMAT = LayerFormat("overlay-userxattr", "user.overlay.opaque")
