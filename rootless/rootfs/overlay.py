"""Assembling a root filesystem from unpacked layers with kernel overlayfs (inside the user namespace).

The mount option string is limited to one page, so lower directories are named through short
symbolic links ("0", "1", ...) in a private link directory, relative to it (the trick containers/storage
uses with its l/ links): a 100-layer image needs about 400 bytes of options.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rootless.errors import RbuildError
from rootless.kernel import linux


@contextlib.contextmanager
def mounted(lowers: list[str], upper: str | None, work: str | None, target: str, links: str) -> Iterator[str]:
    """Mount lowers (top first) + optional upper at target; unmount on exit.

    With no upper and a single lower the lower is bind-mounted read-only (overlay wants two lowers then).
    """
    os.makedirs(links, exist_ok=True)
    names = []
    for i, lower in enumerate(lowers):
        name = format(i, "x")
        os.symlink(lower, os.path.join(links, name))
        names.append(name)
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if upper is None and len(lowers) == 1:
            linux.mount(lowers[0], target, None, linux.MS_BIND | linux.MS_REC)
            linux.mount(None, target, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
        elif not lowers and upper is not None:
            linux.mount(upper, target, None, linux.MS_BIND)
        else:
            opts = "lowerdir=" + ":".join(names)
            if upper is not None and work is not None:
                opts += f",upperdir={upper},workdir={work}"
            opts += ",userxattr"  # layers carry user.overlay.* markers, also when run as real root
            os.chdir(links)
            try:
                linux.mount("overlay", target, "overlay", 0, opts)
            finally:
                os.fchdir(cwd)
    except OSError as e:
        raise RbuildError(f"cannot mount the build's root filesystem at {target}: {e.strerror}") from None
    finally:
        os.close(cwd)
    try:
        yield target
    finally:
        linux.umount(target, linux.MNT_DETACH)
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(links, name))
