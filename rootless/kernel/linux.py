"""Thin ctypes wrappers for the Linux calls Python 3.11 lacks (unshare, mount, pivot_root, prctl, keyctl).

Kept in one place, with errno turned into OSError, so the namespace code reads like the C it replaces.
Every call goes through a libc symbol: system call numbers differ between architectures, so none is
written here. keyctl, which glibc does not wrap, gets its number from libseccomp's per-architecture
tables (the RUN sandbox needs libseccomp for its filter anyway). Only the standard library is imported:
runinit.py loads this file in an isolated interpreter.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

KEYCTL_JOIN_SESSION_KEYRING = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.pivot_root.argtypes = [ctypes.c_char_p, ctypes.c_char_p]  # exported by glibc, though no header declares it
_libc.syscall.restype = ctypes.c_long
_libc.socket.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p]
_libc.close.argtypes = [ctypes.c_int]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]


def _check(ret: int, what: str, path: str | None = None) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {fstype or ''}", target)


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.pivot_root(_b(new_root), _b(put_old)), "pivot_root", new_root)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return int(ret)


def sethostname(name: str) -> None:
    data = name.encode()
    _check(_libc.sethostname(data, len(data)), "sethostname")


def join_session_keyring(nr: int) -> None:
    """Replace the inherited session keyring with a fresh, empty, anonymous one (as runc does).

    nr: keyctl's number on this machine (seccomp.syscall_number), as glibc has no wrapper.
    """
    if _libc.syscall(ctypes.c_long(nr), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(err)}")


_AF_INET, _SOCK_DGRAM, _SOCK_CLOEXEC = 2, 2, 0o2000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 1
_IFREQ_SIZE = 40  # struct ifreq: char ifr_name[16], then a union whose first member here is short ifr_flags


def interface_up(name: str) -> None:
    """Bring a network interface of this network namespace up (SIOCSIFFLAGS, as `ip link set NAME up`).

    Two ioctls on a datagram socket instead of netlink: the RUN sandbox's pid 1 runs in `python -S -I`
    (no site-packages, so no pyroute2) and sets one flag on one interface.
    """
    fd = _libc.socket(_AF_INET, _SOCK_DGRAM | _SOCK_CLOEXEC, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"socket: {os.strerror(err)}")
    try:
        req = ctypes.create_string_buffer(name.encode().ljust(16, b"\0") + bytes(_IFREQ_SIZE - 16), _IFREQ_SIZE)
        if _libc.ioctl(fd, _SIOCGIFFLAGS, req) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"SIOCGIFFLAGS {name}: {os.strerror(err)}")
        flags = int.from_bytes(req.raw[16:18], sys.byteorder) | _IFF_UP
        ctypes.memmove(ctypes.addressof(req) + 16, flags.to_bytes(2, sys.byteorder), 2)
        if _libc.ioctl(fd, _SIOCSIFFLAGS, req) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"SIOCSIFFLAGS {name}: {os.strerror(err)}")
    finally:
        _libc.close(fd)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_filter(program: bytes) -> None:
    """Install a compiled BPF program (struct sock_filter[], 8 bytes each) as this thread's seccomp filter.

    no_new_privs must be set already (an unprivileged process may only filter itself then).
    """
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3


def seccomp_listener(program: bytes, nr: int) -> int:
    """Install a compiled BPF program through seccomp(2) (number `nr`); return its notification listener fd.

    The program's SECCOMP_RET_USER_NOTIF calls then wait for whoever holds that fd (rootless.sandbox.notify).
    """
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    fd = _libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_NEW_LISTENER),
        ctypes.c_void_p(ctypes.addressof(fprog)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(NEW_LISTENER): {os.strerror(err)}")
    return int(fd)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


_STATX_BTIME = 0x800
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_SIZE = 256  # struct statx; stx_mask at 0, stx_btime {i64 tv_sec; u32 tv_nsec} at 80


def birth_time_ns(path: str) -> int | None:
    """An inode's creation time (statx's btime, not following a symlink), None where the filesystem has
    none. Unlike an inode number, which a filesystem may give again to a file made after one was removed,
    it tells a directory made again from the one that was there."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    ret = _libc.statx(-100, os.fsencode(path), _AT_SYMLINK_NOFOLLOW, _STATX_BTIME, buf)  # -100: AT_FDCWD
    _check(ret, "statx", path)
    if not int.from_bytes(buf.raw[0:4], sys.byteorder) & _STATX_BTIME:
        return None
    return int.from_bytes(buf.raw[80:88], sys.byteorder, signed=True) * 1_000_000_000 + int.from_bytes(
        buf.raw[88:92], sys.byteorder
    )
