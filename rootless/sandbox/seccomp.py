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

libseccomp (Debian: libseccomp2) turns names into each architecture's numbers and compiles the
rules into a BPF program, once per build process; each RUN only hands those bytes to the kernel.
The library is called through ctypes directly: a Python binding (pyseccomp) took 30-90 ms to import,
as it asks ldconfig where the library is.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform

from rootless.errors import RbuildError

CLONE_NEWUSER = 0x10000000
ACT_ALLOW = 0x7FFF0000
CMP_MASKED_EQ = 7

# docker: "kexec_*, module loading, reboot ... need CAP_SYS_ADMIN/CAP_SYS_BOOT/...", "keyctl, add_key,
# request_key: the kernel keyring is not namespaced", plus io_uring, which docker refuses since moby 25
DENIED = (
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "fanotify_init",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setdomainname",
    "sethostname",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "_sysctl",
    "sysfs",
    "syslog",
    "umount",
    "umount2",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
    "vm86",
    "vm86old",
)
# docker's allowed personality(2) values: PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32|UNAME26, query
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
# ABIs a CPU of this machine type also runs (docker's "archMap"), as libseccomp names them
COMPAT_ARCHES = {"x86_64": ("x86", "x32"), "aarch64": ("arm",), "s390x": ("s390",)}


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError as e:
        raise RbuildError(f"the RUN sandbox needs libseccomp (Debian: libseccomp2): {e}") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def syscall_number(name: str) -> int:
    """The native number of system call `name` (for calls libc does not wrap)."""
    nr = _lib().seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        raise RbuildError(f"libseccomp knows no system call {name} on {platform.machine()}")
    return int(nr)


def _errno(code: int) -> int:
    return 0x00050000 | code  # SCMP_ACT_ERRNO


def _blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi] (32-bit) as aligned power-of-two blocks, each (mask, value): x in it <=> x & mask == value.

    libseccomp cannot compare one argument twice in a rule, so a range is a union of such blocks.
    """
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 32
        while size > hi - lo + 1:
            size >>= 1
        out.append(((~(size - 1)) & 0xFFFFFFFF, lo))
        lo += size
    return out


def _personality_denials() -> list[tuple[int, int]]:
    """(mask, value) blocks covering every personality docker does not allow.

    Only the low 32 bits are compared: the kernel's argument is an unsigned int, so personality(-1)
    is the query personality(0xffffffff) is.
    """
    out, lo = [], 0
    for allowed in sorted(PERSONALITIES):
        if allowed > lo:
            out += _blocks(lo, allowed - 1)
        lo = allowed + 1
    return out


def _rules() -> list[tuple[str, int, list[tuple[int, int, int, int]]]]:
    """(system call, action, [(arg, op, a, b)...]) for every rule of the filter."""
    eperm = _errno(errno.EPERM)
    rules: list[tuple[str, int, list[tuple[int, int, int, int]]]] = [(name, eperm, []) for name in DENIED]
    flags_arg = 1 if platform.machine().startswith("s390") else 0  # s390's clone takes the stack first
    rules.append(("clone", eperm, [(flags_arg, CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)]))
    rules.append(("unshare", eperm, [(0, CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)]))
    rules.append(("clone3", _errno(errno.ENOSYS), []))
    rules += [("personality", eperm, [(0, CMP_MASKED_EQ, mask, value)]) for mask, value in _personality_denials()]
    return rules


@functools.cache
def program() -> bytes:
    """The filter compiled to BPF (struct sock_filter[]) for this machine, made once per process."""
    lib = _lib()
    ctx = lib.seccomp_init(ACT_ALLOW)
    if not ctx:
        raise RbuildError("libseccomp could not start a filter")
    try:
        for arch in COMPAT_ARCHES.get(platform.machine(), ()):
            token = lib.seccomp_arch_resolve_name(arch.encode())
            if token:  # a libseccomp without that ABI: the kernel kills such calls (a foreign arch)
                lib.seccomp_arch_add(ctx, token)
        for name, action, args in _rules():
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == -1:  # newer than this libseccomp: it cannot be named, so it cannot be refused
                continue
            cmp = (_ArgCmp * max(len(args), 1))(*[_ArgCmp(*a) for a in args])
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(args), cmp)
            if rc < 0:
                raise RbuildError(f"libseccomp refused the rule for {name}: {os.strerror(-rc)}")
        fd = os.memfd_create("rbuild-seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise RbuildError(f"libseccomp could not compile the filter: {os.strerror(-rc)}")
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
