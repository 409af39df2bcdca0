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
ACT_NOTIFY = 0x7FC00000  # SCMP_ACT_NOTIFY: the call waits for the supervisor's answer
CMP_MASKED_EQ = 7
_FLTATR_CTL_OPTIMIZE = 8  # SCMP_FLTATR_CTL_OPTIMIZE (libseccomp 2.5)
S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000

# What a single-uid RUN's supervisor (rootless.sandbox.notify) answers: the ownership-changing calls a user
# namespace mapping one uid refuses, setxattr (so only the supervisor writes rbuild's own records), and
# the process credentials it emulates. The *32 names are x86's 32-bit-id calls (libseccomp maps them).
_SET_IDS = ("setuid", "setgid", "setgroups", "setresuid", "setresgid", "setreuid", "setregid", "setfsuid", "setfsgid")
# get*id: a process that switched ids (apt's _apt sandbox, su) must see the ids it switched to; in a root
# RUN where none did, the supervisor lets the kernel answer at once (busybox calls getuid in every process)
GET_IDS = tuple(
    n + s for n in ("getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups") for s in ("", "32")
)
# stat: the owners recorded for files and devices show where programs look (ls -l, find -user, cp -a)
STATS = ("stat", "fstat", "lstat", "newfstatat", "statx")
NOTIFIED = (
    ("chown", "fchown", "lchown", "fchownat", "chown32", "fchown32", "lchown32")
    + STATS
    + ("setxattr", "lsetxattr", "fsetxattr")
    + _SET_IDS
    + tuple(n + "32" for n in _SET_IDS)
)
# setxattrat(2) (Linux 6.13) is newer than libseccomp 2.5 and gets ENOSYS from a hand-written prefix
# (libc falls back to setxattr, which the supervisor sees); 463 on every ABI listed in COMPAT_ARCHES
_SETXATTRAT = 463
_X32_BIT = 0x40000000

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
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    return lib


def syscall_number(name: str) -> int:
    """The native number of system call `name` (for calls libc does not wrap)."""
    nr = _lib().seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        raise RbuildError(f"libseccomp knows no system call {name} on {platform.machine()}")
    return int(nr)


def native_arch() -> int:
    """This machine's AUDIT_ARCH value (seccomp_data.arch of a native call)."""
    return int(_lib().seccomp_arch_native())


@functools.cache
def arch_numbers(names: tuple[str, ...]) -> dict[tuple[int, int], str]:
    """(AUDIT_ARCH value, number) -> name of each system call in `names`, on every ABI the filter covers.

    libseccomp's architecture tokens are the kernel's AUDIT_ARCH values that seccomp_data.arch holds.
    """
    lib = _lib()
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    arches = [lib.seccomp_arch_native()] + [
        lib.seccomp_arch_resolve_name(a.encode()) for a in COMPAT_ARCHES.get(platform.machine(), ())
    ]
    out = {}
    for arch in (a for a in arches if a):
        for name in names:
            nr = lib.seccomp_syscall_resolve_name_arch(arch, name.encode())
            if nr >= 0:
                out[(arch, nr)] = name
    return out


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


def _rules(emulate: bool = False) -> list[tuple[str, int, list[tuple[int, int, int, int]]]]:
    """(system call, action, [(arg, op, a, b)...]) for every rule of the filter; `emulate`: single-uid."""
    eperm = _errno(errno.EPERM)
    rules: list[tuple[str, int, list[tuple[int, int, int, int]]]] = [(name, eperm, []) for name in DENIED]
    flags_arg = 1 if platform.machine().startswith("s390") else 0  # s390's clone takes the stack first
    rules.append(("clone", eperm, [(flags_arg, CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)]))
    rules.append(("unshare", eperm, [(0, CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)]))
    rules.append(("clone3", _errno(errno.ENOSYS), []))
    rules += [("personality", eperm, [(0, CMP_MASKED_EQ, mask, value)]) for mask, value in _personality_denials()]
    if emulate:
        rules += [(name, ACT_NOTIFY, []) for name in NOTIFIED + GET_IDS]
        for name, arg in (("mknod", 1), ("mknodat", 2)):  # device nodes only: fifos and files stay native
            rules += [(name, ACT_NOTIFY, [(arg, CMP_MASKED_EQ, S_IFMT, kind)]) for kind in (S_IFCHR, S_IFBLK)]
    return rules


def _deny_setxattrat() -> bytes:
    """BPF (struct sock_filter[]) that answers setxattrat with ENOSYS on every ABI, then falls through."""
    import struct

    ins = [
        (0x20, 0, 0, 0),  # BPF_LD|BPF_W|BPF_ABS: seccomp_data.nr
        (0x54, 0, 0, ~_X32_BIT & 0xFFFFFFFF),  # BPF_ALU|BPF_AND|BPF_K: x32's bit off
        (0x15, 0, 1, _SETXATTRAT),  # BPF_JMP|BPF_JEQ|BPF_K
        (0x06, 0, 0, _errno(errno.ENOSYS)),  # BPF_RET|BPF_K
    ]
    return b"".join(struct.pack("=HBBI", *i) for i in ins)


@functools.cache
def program(emulate: bool = False) -> bytes:
    """The filter compiled to BPF (struct sock_filter[]) for this machine, made once per process.

    `emulate`: a single-uid RUN's filter, whose NOTIFIED and GET_IDS calls go to the supervisor
    (rootless.sandbox.notify).
    """
    lib = _lib()
    ctx = lib.seccomp_init(ACT_ALLOW)
    if not ctx:
        raise RbuildError("libseccomp could not start a filter")
    try:
        if emulate:  # a binary tree of system call numbers: the longer rule list costs no more per call
            lib.seccomp_attr_set(ctx, _FLTATR_CTL_OPTIMIZE, 2)
        for arch in COMPAT_ARCHES.get(platform.machine(), ()):
            token = lib.seccomp_arch_resolve_name(arch.encode())
            if token:  # a libseccomp without that ABI: the kernel kills such calls (a foreign arch)
                lib.seccomp_arch_add(ctx, token)
        for name, action, args in _rules(emulate):
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
            bpf = os.pread(fd, os.fstat(fd).st_size, 0)
            return _deny_setxattrat() + bpf if emulate else bpf
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
