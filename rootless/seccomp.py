"""The RUN sandbox's seccomp filter: docker's default profile, written as a deny list.

docker's profile allows a list of system calls and refuses the rest; most of what it leaves out is
refused to a RUN here anyway by the capability bounding set (mount, sethostname, setns, ...). What
works without any capability, or only needs capabilities in the build's own user namespace, is
refused by this filter with EPERM, as docker does: the kernel keyring (not namespaced), new user
namespaces (they would hand the RUN every capability again), kernel modules, kexec, bpf, perf,
userfaultfd, io_uring, file handles, the mount API, time setting, swap, accounting, and personality
values other than the few docker allows. clone3 gets ENOSYS, as in docker, so libc falls back to
clone, whose flags the filter can see. The rules apply to every ABI the CPU can run (x86 and x32 on
x86_64, arm on aarch64, s390 on s390x): a 32-bit program must not get around them.

libseccomp (through pyseccomp) turns names into each architecture's numbers.
"""

from __future__ import annotations

import errno
import platform
from typing import Any

from rootless.errors import RbuildError

_sc: Any = None
_missing = ""
try:
    import pyseccomp

    _sc = pyseccomp
except (ImportError, RuntimeError) as e:  # RuntimeError: pyseccomp found no libseccomp.so
    _missing = str(e)

CLONE_NEWUSER = 0x10000000

# docker: "kexec_*, module loading, reboot ... need CAP_SYS_ADMIN/CAP_SYS_BOOT/...", "keyctl, add_key,
# request_key: the kernel keyring is not namespaced", plus what docker blocks for every container since
# io_uring's removal from its profile (moby 25)
DENIED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "fanotify_init", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick", "get_kernel_syms",
    "init_module", "io_uring_enter", "io_uring_register", "io_uring_setup", "ioperm", "iopl", "kexec_file_load",
    "kexec_load", "keyctl", "lookup_dcookie", "mount", "mount_setattr", "move_mount", "name_to_handle_at",
    "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open", "pivot_root", "query_module", "quotactl",
    "quotactl_fd", "reboot", "request_key", "setdomainname", "sethostname", "setns", "settimeofday", "stime",
    "swapoff", "swapon", "_sysctl", "sysfs", "syslog", "umount", "umount2", "uselib", "userfaultfd", "ustat",
    "vhangup", "vm86", "vm86old",
)
# docker's allowed personality(2) values: PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32|UNAME26, query
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
# ABIs a CPU of this machine type also runs (docker's "archMap")
COMPAT_ARCHES = {"x86_64": ("X86", "X32"), "aarch64": ("ARM",), "s390x": ("S390",)}


def require() -> Any:
    """pyseccomp's module, or a clear error naming what is missing."""
    if _sc is None:
        raise RbuildError(f"the RUN sandbox needs libseccomp (Debian: libseccomp2) and pyseccomp: {_missing}")
    return _sc


def syscall_number(name: str) -> int:
    """The native number of system call `name` (for calls libc does not wrap)."""
    sc = require()
    nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if nr < 0:
        raise RbuildError(f"libseccomp knows no system call {name} on {platform.machine()}")
    return int(nr)


def _blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi] as aligned power-of-two blocks, each (mask, value) with x in block <=> x & mask == value.

    libseccomp cannot compare one argument twice in a rule, so a range is a union of such blocks.
    """
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 64
        while size > hi - lo + 1:
            size >>= 1
        out.append(((~(size - 1)) & 0xFFFFFFFFFFFFFFFF, lo))
        lo += size
    return out


def _personality_denials() -> list[tuple[int, int]]:
    """(mask, value) blocks covering every 32-bit personality argument docker does not allow."""
    out, lo = [], 0
    for allowed in sorted(PERSONALITIES):
        if allowed > lo:
            out += _blocks(lo, allowed - 1)
        lo = allowed + 1
    return out


def load() -> None:
    """Install the filter on this (single-threaded) process; the exec that follows keeps it."""
    s = require()
    eperm = s.ERRNO(errno.EPERM)
    f = s.SyscallFilter(s.ALLOW)
    for arch in COMPAT_ARCHES.get(platform.machine(), ()):
        try:
            f.add_arch(getattr(s.Arch, arch))
        except OSError:  # libseccomp without that ABI: the kernel then kills such syscalls (bad arch)
            pass

    def deny(name: str, action: int, *args: Any) -> None:
        nr = s.resolve_syscall(s.Arch.NATIVE, name)
        if nr == -1:  # unknown to this libseccomp (a system call newer than the library)
            return
        f.add_rule(action, nr, *args)

    for name in DENIED:
        deny(name, eperm)
    flags_arg = 1 if platform.machine().startswith("s390") else 0  # s390's clone takes the stack first
    deny("clone", eperm, s.Arg(flags_arg, s.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    deny("unshare", eperm, s.Arg(0, s.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    deny("clone3", s.ERRNO(errno.ENOSYS))
    deny("personality", eperm, s.Arg(0, s.GT, 0xFFFFFFFF))
    for mask, value in _personality_denials():
        deny("personality", eperm, s.Arg(0, s.MASKED_EQ, mask, value))
    f.load()
