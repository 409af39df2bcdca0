"""Assembling a root filesystem from unpacked layers with kernel overlayfs (inside the user namespace).

The mount option string is limited to one page, so lower directories are named through short
symbolic links ("0", "1", ...) in a private link directory, relative to it (the trick containers/storage
uses with its l/ links): a 100-layer image needs about 400 bytes of options.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator

from rootless.errors import RbuildError
from rootless.kernel import linux
from rootless.kernel.fspath import open_beneath
from rootless.layer.format import is_opaque
from rootless.rootfs.driver import RootfsDriver, WritableRoot

_CWD = threading.Lock()  # the mount names its lowers relative to the working directory, one per process


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
            with _CWD:  # stages built at once mount from threads of their own
                os.chdir(links)
                try:
                    linux.mount("overlay", target, "overlay", 0, opts)
                finally:
                    os.fchdir(cwd)
    except OSError as e:
        store = os.path.dirname(upper) if upper is not None else (os.path.dirname(lowers[0]) if lowers else target)
        raise RbuildError(mount_failure(e, target, store)) from None
    finally:
        os.close(cwd)
    try:
        yield target
    finally:
        linux.umount(target, linux.MNT_DETACH)
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(links, name))


class OverlayDriver(RootfsDriver):
    """Kernel overlayfs in the build's user namespace: the upper dir is the step's layer, no copy."""

    name = "overlay"

    def view(self, lowers: list[str], target: str) -> contextlib.AbstractContextManager[str]:
        if not lowers:
            return contextlib.nullcontext(target)
        return mounted(lowers, None, None, target, target + "-links")

    @contextlib.contextmanager
    def writable(self, lowers: list[str], workdir: str, target: str) -> Iterator[WritableRoot]:
        upper, work = os.path.join(workdir, "upper"), os.path.join(workdir, "work")
        os.mkdir(upper, 0o755)
        os.mkdir(work, 0o700)
        root = _OverlayRoot(target, upper, lowers)
        with mounted(lowers, upper, work, target, target + "-links"):
            yield root


class _OverlayRoot(WritableRoot):
    def __init__(self, path: str, upper: str, lowers: list[str]) -> None:
        super().__init__(path, upper)
        self.lowers = lowers

    def diff(self) -> str:
        _prune_copied_up(self.upper, self.lowers, self.touched)
        return self.upper


def _prune_copied_up(upper: str, lowers: list[str], paths: list[str]) -> None:
    """Drop directories the overlay copied up only because a mount point was made (and removed) in them.

    The upper dir holds what the RUN wrote, so nothing in it is followed: directories are reached by fd
    without symlinks, and one is removed only if empty and identical to the layer below.
    """
    for p in sorted(set(paths), key=lambda x: -x.count("/")):
        rel = p.strip("/")
        try:
            pfd = open_beneath(upper, os.path.dirname(rel))
        except OSError:
            continue
        try:
            name = os.path.basename(rel)
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                continue
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
            try:
                if os.listdir(dfd) or is_opaque(dfd):
                    continue
            finally:
                os.close(dfd)
            for lower in lowers:
                try:
                    lfd = open_beneath(lower, os.path.dirname(rel))
                except OSError:
                    continue
                try:
                    lst = os.stat(name, dir_fd=lfd, follow_symlinks=False)
                except OSError:
                    continue
                finally:
                    os.close(lfd)
                if (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (
                    lst.st_mode,
                    lst.st_uid,
                    lst.st_gid,
                    lst.st_mtime_ns,
                ):
                    os.rmdir(name, dir_fd=pfd)
                break
        except OSError:
            continue
        finally:
            os.close(pfd)


def _filesystem(path: str) -> str:
    """The type of the filesystem holding `path` (the longest mount point above it in mountinfo)."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                point = fields[4].replace("\\040", " ")
                sep = fields.index("-")
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, kind = point, fields[sep + 1]
    except (OSError, ValueError, IndexError):
        pass
    return kind


def mount_failure(e: OSError, target: str, store: str) -> str:
    """One line for a failed overlay mount: what, where (the store's filesystem), why, and the remedy."""
    fs = _filesystem(store)
    what = f"cannot mount overlay (the step's root filesystem) at {target} over layers in {store} ({fs}): {e.strerror}"
    if e.errno == errno.EPERM:
        return what + "; mounts are not permitted here (no user namespace of rbuild's own, or a seccomp/LSM policy)"
    if e.errno == errno.EINVAL and (fs in ("overlay", "nfs", "nfs4") or fs.startswith("fuse")):
        return (
            what + f"; kernel overlay cannot use {fs} for its layers here: put the store on a local disk (--root DIR)"
        )
    return what
