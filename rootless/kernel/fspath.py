"""Resolving paths inside a root filesystem without ever leaving it (symlinks resolved relative to root)."""

from __future__ import annotations

import os
import posixpath
import stat
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import ctypes

from rootless.errors import RbuildError

_MAX_LINKS = 255
_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic numbering since Linux 5.1)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


def secure_join(root: str, path: str, follow_final: bool = True, followed: list[str] | None = None) -> str:
    """Host path of `path` in the tree at `root`, following symlinks as if root were "/".

    `..` never climbs above root and absolute link targets restart at root, so the result is
    always inside root (unless something swaps a component concurrently, which nothing does in a build).
    Each symlink followed is appended to `followed` (its path below root), for callers that judge them.
    """
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if (parts or follow_final) and os.path.islink(candidate):
            links += 1
            if links > _MAX_LINKS:
                raise RbuildError(f"too many levels of symbolic links resolving {path}")
            if followed is not None:
                followed.append("/".join([*resolved, part]))
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved) if resolved else root


def clean_abs(path: str, cwd: str = "/") -> str:
    """An absolute, normalised container path (relative paths are taken from cwd)."""
    joined = posixpath.join(cwd or "/", path)
    norm = posixpath.normpath(joined)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


def open_beneath(root: str, rel: str) -> int:
    """An fd of the directory `rel` below root, refusing any symlink on the way (OSError)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        for part in [p for p in rel.split("/") if p and p != "."]:
            if part == "..":
                raise OSError(22, "'..' in a path", rel)
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
}


def open_regular(path: str, shown: str, *, dir_fd: int | None = None, follow: bool = True) -> BinaryIO:
    """Open for reading a file that must be a regular file: a FIFO planted where rbuild expects a file
    (in an image layout, an archive, a build context) would block it forever, a device never end.

    Checked before opening (opening a device can have effects) and again on the open descriptor (the
    path may have changed in between); the open itself never blocks (O_NONBLOCK). `follow=False`
    refuses a symlink as the last component. An RbuildError names `shown`; other failures are OSError.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)

    def check(mode: int) -> None:
        if not stat.S_ISREG(mode):
            raise RbuildError(f"{shown} is {_KINDS.get(stat.S_IFMT(mode), 'not a file')}, not a regular file")

    check(os.stat(path, dir_fd=dir_fd, follow_symlinks=follow).st_mode)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        check(os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def inside(path: str, root: str) -> bool:
    """Whether path, all symlinks resolved, is root or below it."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip("/") + "/")


_LIBC: list[ctypes.CDLL] = []  # loaded on first use (runinit imports this module, and never needs it)


def _libc() -> ctypes.CDLL:
    import ctypes

    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def open_in_root(root_fd: int, path: bytes, flags: int) -> int:
    """openat2(RESOLVE_IN_ROOT): `path` resolved with root_fd as "/", atomically (no check-then-use race).

    For a directory fd that is another process's root (/proc/PID/root): its symlinks and ".." never lead
    outside it, whatever that process does meanwhile; /proc magic links are refused. OSError on failure.
    """
    import ctypes

    libc = _libc()
    how = (ctypes.c_uint64 * 3)(flags | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = libc.syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(root_fd), ctypes.c_char_p(path), how, ctypes.c_size_t(24)
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    return int(fd)
