"""Running a RUN step: new mount, pid, ipc and uts namespaces of the build's user namespace.

The sandbox is data: plan() lists the operations (describe() shows each). The build process (already
uid 0 in the user namespace, maybe with threads) starts runinit.py as a new program in a new session,
so no Python runs in a fork of the builder, and the RUN leaves the caller's process group and
controlling terminal behind. runinit unshares the namespaces and forks pid 1 of the new pid
namespace, which carries out the operations: a session of its own, a fresh session keyring, the
container's view (/proc with docker's masked paths, a minimal /dev, read-only /sys, /etc/hosts,
/etc/hostname, /etc/resolv.conf), pivot_root into the merged tree, docker's default capability
bounding set, no_new_privs, the user's ids and groups, only file descriptors 0-2, the seccomp
filter, and exec.
When rbuild's output is a terminal, the RUN writes into a pipe that rbuild copies to it, as docker
and buildah do: a RUN never holds a descriptor of the user's terminal.
Mount points that had to be created in the tree are removed again afterwards, so they leave no trace.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rootless.errors import Cancelled, RbuildError
from rootless.kernel import linux
from rootless.kernel.fspath import secure_join

# docker's default capabilities: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
# NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP
DEFAULT_CAPS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31)
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# host device nodes bound into /dev, each only if it is that very device (major, minor). /dev/tty
# (5, 0) opens the opener's controlling terminal, and a RUN has none (its own session): ENXIO.
DEV_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOSTNAME = "rbuild"
_RUNINIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runinit.py")


@dataclass
class MountSpec:
    """One RUN --mount, resolved to the host: a bind of `source` or a tmpfs, at `target` in the container."""

    kind: str  # "bind" or "tmpfs"
    target: str
    source: str = ""
    readonly: bool = True
    is_file: bool = False
    size: int | None = None


@dataclass
class RunSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    hostname: str = HOSTNAME
    output_fd: int = 2  # where the step's stdout and stderr go (relayed through a pipe if it is a terminal)
    # or, if set, what receives them chunk by chunk as they arrive (a reporter's Output events)
    output: Callable[[bytes], None] | None = None
    dev_files: dict[str, str] = field(default_factory=dict)  # /dev/NAME -> host file, bound read-only
    mounts: list[MountSpec] = field(default_factory=list)
    namespaces: bool = True  # False: no namespace can be made (rung 4), the RUN is chroot'ed (see plan_chroot)
    # single-uid build: the RUN runs as the one mapped uid (0), its supervisor (sandbox.notify) emulates
    # uid/gid/groups above and records owners and devices; `lowers`: the RUN's lower layer dirs
    emulate: bool = False
    lowers: list[str] = field(default_factory=list)
    upper: str = ""  # the overlay's upper dir: owners of symlinks and fifos are recorded with its inodes
    records: bool | None = None  # some lower holds an owner or device record (None: the supervisor looks)
    warnings: list[str] = field(default_factory=list)  # filled by run(): what could not be emulated exactly
    # `rbuild run`: the command's own standard input, output and error (instead of output_fd for both and
    # no input), and a socket to which the sandbox sends the master side of a terminal it makes in the
    # container's own /dev/pts, the command's 0-2 and controlling terminal (`-t`); -1: none
    stdio: tuple[int, int, int] | None = None
    terminal_socket: int = -1
    # "host": the builder's network namespace; "none": one of its own with only the loopback interface, up
    network: str = "host"
    # a descriptor that becomes readable when the build is cancelled (another stage failed): the RUN is
    # ended and `errors.Cancelled` raised; -1: none (the build's main thread, where signals interrupt)
    cancel_fd: int = -1


@dataclass
class User:
    uid: int
    gid: int
    groups: list[int]
    home: str


def _read_db(root: str, name: str) -> list[list[str]]:
    path = secure_join(root, "/etc/" + name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    with open(fd, encoding="utf-8", errors="replace") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device there must not hang the build
            return []
        return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]


_NO_ID = 2**32 - 1  # (uid_t)-1 means "no change" to chown and setresuid: no process or file has it


def _is_number(s: str) -> bool:
    """ASCII digits only: "²" is a digit to str.isdigit, but no number to int() (or to docker)."""
    return s.isascii() and s.isdigit()


def resolve_user(root: str, spec: str) -> User:
    """docker's USER semantics: name or uid, optional :group; names looked up in the image's files."""
    user, _, group = (spec or "0").partition(":")
    passwd = _read_db(root, "passwd")
    entry = None
    if _is_number(user):
        uid = int(user)
        entry = next((e for e in passwd if len(e) >= 7 and e[2] == user), None)
    else:
        entry = next((e for e in passwd if len(e) >= 7 and e[0] == user), None)
        if entry is None:
            raise RbuildError(f"unable to find user {user}: no matching entries in passwd file")
        uid = int(entry[2]) if _is_number(entry[2]) else 0
    gid = int(entry[3]) if entry and _is_number(entry[3]) else 0
    home = entry[5] if entry else "/"
    if uid == 0 and not entry:
        home = "/root"
    groupdb = _read_db(root, "group")
    if group:
        if _is_number(group):
            gid = int(group)
        else:
            g = next((e for e in groupdb if len(e) >= 3 and e[0] == group and _is_number(e[2])), None)
            if g is None:
                raise RbuildError(f"unable to find group {group}: no matching entries in group file")
            gid = int(g[2])
        member: set[int] = set()
    else:
        name = entry[0] if entry else None
        member = {int(e[2]) for e in groupdb if len(e) >= 4 and _is_number(e[2]) and name and name in e[3].split(",")}
    # supplementary groups: the groups /etc/group lists the user in, and the primary group (buildah and
    # docker both add it); an explicit group stands alone
    groups = sorted(member | {gid})
    if max(uid, *groups) >= _NO_ID:
        raise RbuildError(f"user {spec}: user and group ids must be below {_NO_ID}")
    return User(uid, gid, groups, home)


class _Stubs:
    """Mount points made in the tree for one RUN, removed again afterwards without trusting path names.

    The RUN can rename and replace directories (even with symlinks to host paths) before the cleanup
    runs, so every entry is remembered as (parent directory fd, name, inode): only that very inode is
    removed, only inside that very directory, and parent times are restored through the fd.
    """

    _DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(self, root: str) -> None:
        self.root = root
        self.made: list[tuple[int, str, tuple[int, int], bool]] = []
        self.ours: set[tuple[int, int]] = set()  # files made with content (device nodes, scripts): removed as they are
        self.parents: dict[str, tuple[int, int, int]] = {}  # container path -> (fd, atime, mtime)
        self.fds: list[int] = []

    def _open_dir(self, host: str) -> int:
        fd = os.open(host, self._DIR_FLAGS)
        self.fds.append(fd)
        return fd

    def ensure(self, path: str, is_dir: bool) -> str:
        """Host path of `path` in the tree, created (with missing parents) when absent."""
        host = secure_join(self.root, path)
        if os.path.lexists(host):
            return host
        parent = os.path.dirname(path.rstrip("/")) or "/"
        parent_host = self.ensure(parent, True) if parent != "/" else self.root
        pfd = self._open_dir(parent_host)
        if parent not in self.parents:
            st = os.fstat(pfd)
            self.parents[parent] = (pfd, st.st_atime_ns, st.st_mtime_ns)
        name = os.path.basename(path.rstrip("/"))
        if is_dir:
            os.mkdir(name, 0o755, dir_fd=pfd)
        else:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=pfd))
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        self.made.append((pfd, name, (st.st_dev, st.st_ino), is_dir))
        return os.path.join(parent_host, name)

    def device(self, path: str, major: int, minor: int) -> None:
        """A character device at `path` (absent so far), for a RUN without mounts; removed afterwards."""
        if os.path.lexists(secure_join(self.root, path)):
            return  # the image's own entry stays
        self.ensure(path, False)
        pfd, name, _, _ = self.made[-1]
        os.unlink(name, dir_fd=pfd)
        os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=pfd)
        os.chmod(name, 0o666, dir_fd=pfd, follow_symlinks=False)
        self._take_last(pfd, name)

    def file(self, path: str, source: str) -> None:
        """A copy of the host file `source` at `path` (absent so far); removed afterwards."""
        host = secure_join(self.root, path)
        if os.path.lexists(host):
            raise RbuildError(f"{path} exists in the image")
        self.ensure(path, False)
        pfd, name, _, _ = self.made[-1]
        with open(source, "rb") as src:
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            with open(fd, "wb") as dst:
                dst.write(src.read())
                os.fchmod(dst.fileno(), 0o755)
        self._take_last(pfd, name)

    def _take_last(self, pfd: int, name: str) -> None:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        self.made[-1] = (pfd, name, (st.st_dev, st.st_ino), False)
        self.ours.add((st.st_dev, st.st_ino))

    def restore(self) -> list[str]:
        """Remove what was made and restore parent times; return the existing parents that were touched."""
        made_dirs = set()
        for pfd, name, ino, is_dir in reversed(self.made):
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) != ino:
                    continue
                if is_dir:
                    os.rmdir(name, dir_fd=pfd)
                    made_dirs.add(ino)
                elif ino in self.ours or (stat.S_ISREG(st.st_mode) and st.st_size == 0):
                    os.unlink(name, dir_fd=pfd)
        touched = []
        for path, (fd, atime, mtime) in self.parents.items():
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in made_dirs:
                    continue
                os.utime(fd, ns=(atime, mtime))
                if path != "/":
                    touched.append(path)
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        return touched


def _host_device(name: str) -> bool:
    try:
        st = os.stat("/dev/" + name)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == DEV_NODES[name]


Op = list[Any]  # [name, *arguments]: one step runinit.py carries out in pid 1 of the RUN's namespaces


def plan(
    spec: RunSpec,
    files: dict[str, str],
    groups: list[int] | None,
    filter_: bytes,
    keyctl: int,
    notify: tuple[int, int] = (-1, 0),
    fresh_proc: bool = True,
) -> list[Op]:
    """The RUN sandbox as data: the ordered operations that build the container's view and exec.

    Paths in the tree are container paths, resolved when their operation runs; sources are host paths.
    groups: the supplementary groups to set, None to keep the builder's (see _settable_groups);
    filter_: the compiled seccomp program; keyctl: that system call's number here; notify: (socket fd,
    seccomp's number) when the filter's listener goes to a supervisor over that socket (spec.emulate).
    fresh_proc False: the RUN shares the builder's pid namespace and gets its /proc bound recursively
    (its masks included), for where a fresh procfs cannot be mounted (see _SharedPid).
    """
    nosuid = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    ops: list[Op] = [
        ["setsid"],  # no controlling terminal; `kill 0` reaches only the RUN's own processes
        ["keyring", keyctl],  # a fresh session keyring: the caller's keys stay out of reach
        ["hostname", spec.hostname],
    ]
    if spec.network == "none":  # runinit unshared the network namespace: lo is there, down
        ops.append(["interface-up", "lo"])
    ops += [
        ["private"],
        ["root-mount"],  # a tree that is a plain directory (the copy rung) becomes a mount for pivot_root
        ["proc", "/proc"] if fresh_proc else ["proc-bind", "/proc"],
        ["mount", "tmpfs", "/dev", "tmpfs", linux.MS_NOSUID, "mode=755,size=65536k", True],
    ]
    ops += [["device", "/dev/" + name, "/dev/" + name] for name in DEV_NODES if _host_device(name)]
    ops += [
        ["symlink", target, "/dev/" + name]
        for name, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("core", "/proc/kcore"),
            ("ptmx", "pts/ptmx"),
        )
    ]
    ops += [["bind-file", source, "/dev/" + os.path.basename(path)] for path, source in spec.dev_files.items()]
    ops += [
        ["mkdir", "/dev/pts", 0o755],
        ["devpts", "/dev/pts"],
        ["mkdir", "/dev/shm", 0o1777],
        ["mount", "shm", "/dev/shm", "tmpfs", nosuid, "mode=1777,size=65536k", True],
        ["mkdir", "/dev/mqueue", 0o755],
        ["mount", "mqueue", "/dev/mqueue", "mqueue", nosuid, None, False],
        ["sys", "/sys"],
    ]
    ops += [["mount", source, path, None, linux.MS_BIND, None, True] for path, source in files.items()]
    for m in spec.mounts:
        if m.kind == "tmpfs":
            opts = "mode=1777" + (f",size={m.size}" if m.size else "")
            ops.append(["mount", "tmpfs", m.target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, opts, True])
            continue
        ops.append(["mount", m.source, m.target, None, linux.MS_BIND | linux.MS_REC, None, True])
        ops.append(["restrict-bind", m.target, m.readonly])  # nosuid, nodev (and ro), keeping locked flags
    ops += [["mask", path] for path in MASKED_PATHS]
    ops += [["readonly", path] for path in READONLY_PATHS]
    ops += [["pivot-root"], ["chdir", spec.cwd]]
    if spec.terminal_socket >= 0:  # the slave is the user's, as runc makes it (emulated ids: the one real uid)
        ops.append(["terminal", spec.terminal_socket, -1 if spec.emulate else spec.uid])
    ops += [["capabilities", list(DEFAULT_CAPS)], ["no-new-privs"]]
    if groups is not None:
        ops.append(["groups", groups])
    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    # only 0-2 reach the RUN: a descriptor rbuild's caller left open (a directory, a socket) would lead
    # out of the sandbox; the filter comes last, so the setup itself is not filtered
    ids = [0, 0] if spec.emulate else [spec.uid, spec.gid]  # emulated: the supervisor answers get*id
    kept = [notify[0]] if notify[0] >= 0 else []
    ops += [["ids", *ids], ["close-fds", kept], ["seccomp", filter_, *notify], ["exec", spec.argv, env]]
    return ops


# a RUN without mounts keeps CAP_SYS_CHROOT out of docker's set: root that may chroot again walks out of one
CHROOT_CAPS = tuple(c for c in DEFAULT_CAPS if c != 18)
CHROOT_DEV_NODES = ("null", "zero", "full", "random", "urandom")  # no tty: a RUN has no terminal


def plan_chroot(spec: RunSpec, groups: list[int] | None, filter_: bytes, keyctl: int) -> list[Op]:
    """The RUN where no namespace can be made (rung 4: root of a container without CAP_SYS_ADMIN).

    No mounts at all: the step's tree gets the standard device nodes by mknod (removed afterwards), no
    /proc, /sys, /dev/pts or /dev/shm, and the image's own /etc/hosts, /etc/hostname and
    /etc/resolv.conf; then chroot, docker's capabilities without CAP_SYS_CHROOT (the classic way out of
    a chroot), no_new_privs, the user's ids, fds 0-2, the seccomp filter, in a new session. Lost
    against the namespace sandbox: the pid namespace (the RUN sees no /proc, but may signal the
    builder's processes of its uid), the mount namespace (chroot is the only view), ipc and uts (the
    hostname is the container's). rbuild in a CI job runs inside the job's container already.
    """
    ops: list[Op] = [["setsid"], ["keyring", keyctl], ["chroot"], ["chdir", spec.cwd]]
    ops += [["capabilities", list(CHROOT_CAPS)], ["no-new-privs"]]
    if groups is not None:
        ops.append(["groups", groups])
    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    ops += [["ids", spec.uid, spec.gid], ["close-fds", []], ["seccomp", filter_, -1, 0], ["exec", spec.argv, env]]
    return ops


_MS_NAMES = {
    linux.MS_RDONLY: "ro",
    linux.MS_NOSUID: "nosuid",
    linux.MS_NODEV: "nodev",
    linux.MS_NOEXEC: "noexec",
    linux.MS_REMOUNT: "remount",
    linux.MS_BIND: "bind",
    linux.MS_REC: "rec",
}


def describe(op: Op) -> str:
    """One operation as a line for --log-level debug."""
    name, args = op[0], op[1:]
    if name == "mount":
        source, target, fstype, flags, data, required = args
        shown = ",".join(n for bit, n in _MS_NAMES.items() if flags & bit)
        what = f"mount {fstype or ''} {source or ''} on {target} ({shown}{',' + data if data else ''})"
        return " ".join(what.split()) + ("" if required else " (if possible)")
    if name == "mkdir":
        return f"mkdir {args[0]} {args[1]:04o}"
    if name == "seccomp":
        listener = ", listener to the supervisor" if args[1] >= 0 else ""
        return f"seccomp filter ({len(args[0]) // 8} BPF instructions{listener})"
    if name == "exec":
        return f"exec {args[0]} (env {sorted(args[1])})"
    return " ".join([name, *(str(a) for a in args)])


def run(
    root: str, spec: RunSpec, scratch: str, touched: list[str] | None = None, log: Callable[[str], None] | None = None
) -> int:
    """Run spec in the tree mounted at root; return the exit status. scratch: a private temp dir.

    Existing directories in which mount points had to be created are appended to `touched` (as
    container paths): an overlay copied them up, and the caller may drop those copies again.
    log, if given, receives the sandbox's operations, one line each (--log-level debug).
    """
    if not spec.argv:
        raise RbuildError("RUN has no command")
    stubs = _Stubs(root)
    if not spec.namespaces:
        if spec.network == "none":
            raise RbuildError(
                "--network=none needs a network namespace, and none can be made here (no user namespace, no "
                "CAP_SYS_ADMIN); allow user namespaces for rbuild to use it"
            )
        if spec.mounts:
            raise RbuildError(
                "RUN --mount needs a mount namespace, and none can be made here (no user namespace, no "
                "CAP_SYS_ADMIN); allow user namespaces for rbuild to use it"
            )
        try:
            host = stubs.ensure("/dev", True)
            if not os.path.isdir(host) or os.path.islink(host):
                raise RbuildError("/dev in the image is not a directory")
            for name in CHROOT_DEV_NODES:
                stubs.device("/dev/" + name, *DEV_NODES[name])
            for path, source in spec.dev_files.items():
                stubs.file(path, source)
            return _spawn_once(root, spec, {}, log, True)
        finally:
            parents = stubs.restore()
            if touched is not None:
                touched += parents
    files: dict[str, str] = {}
    contents = {
        "/etc/hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{spec.hostname}\n",
        "/etc/hostname": spec.hostname + "\n",
        "/etc/resolv.conf": _resolv_conf(),
    }
    try:
        for path in ("/proc", "/dev", "/sys", "/etc"):
            host = stubs.ensure(path, True)
            if not os.path.isdir(host) or os.path.islink(host):
                raise RbuildError(f"{path} in the image is not a directory")
        for path, text in contents.items():
            host = stubs.ensure(path, False)
            if not stat.S_ISREG(os.stat(host).st_mode):
                continue
            src = os.path.join(scratch, os.path.basename(path))
            with open(src, "w") as f:
                f.write(text)
            os.chmod(src, 0o644)
            files[path] = src
        for m in spec.mounts:
            host = stubs.ensure(m.target, not m.is_file)
            if os.path.isdir(host) == m.is_file:
                raise RbuildError(f"--mount target {m.target} is a {'directory' if m.is_file else 'file'} in the image")
        return _spawn_run(root, spec, files, log)
    finally:
        parents = stubs.restore()
        if touched is not None:
            touched += parents


def _resolv_conf() -> str:
    try:
        with open("/etc/resolv.conf") as f:
            lines = [ln for ln in f.read().splitlines() if not ln.strip().startswith("nameserver 127.")]
    except OSError:
        lines = []
    if not any(ln.strip().startswith("nameserver") for ln in lines):
        lines += ["nameserver 8.8.8.8", "nameserver 8.8.4.4"]
    return "\n".join(lines) + "\n"


def _relay(src: int, sink: Callable[[bytes], None]) -> int:
    """Hand what is waiting in pipe src to sink; return the bytes passed on, 0 at end of file, -1 if none."""
    try:
        data = os.read(src, 65536)
    except BlockingIOError:
        return -1
    if data:
        sink(data)
    return len(data)


def _write_all(dst: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(dst, view) :]
        except OSError:  # the terminal went away: the RUN's output is dropped, the RUN goes on
            break


def _wait_interruptibly(pid: int, relay: int, out: Callable[[bytes], None], cancel: int = -1) -> int:
    """waitpid that Ctrl-C and SIGTERM always interrupt, passing the RUN's output from `relay` (if >= 0) to out;
    `cancel` (if >= 0) readable raises `Cancelled`.

    A signal may be delivered to any thread of the builder (layer and registry code use worker threads);
    then a main thread blocked in waitpid would never see it until the RUN ends. The signal module's
    wakeup fd is written whichever thread takes the signal, so waiting on it and on a pidfd together
    hands the signal to the main thread's Python handler at once. A stage's worker thread (parallel
    stages, build/schedule.py) cannot take signals: the main thread does, and cancels it through `cancel`.
    """
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    pidfd = os.pidfd_open(pid)
    main = threading.current_thread() is threading.main_thread()
    old = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False) if main else -1
    watched = [pidfd, rfd] + ([cancel] if cancel >= 0 else []) + ([relay] if relay >= 0 else [])
    try:
        while True:
            ready, _, _ = select.select(watched, [], [])
            if rfd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(rfd, 512)  # the Python handler (KeyboardInterrupt) runs right after select
            if cancel >= 0 and cancel in ready:
                raise Cancelled()
            if relay in ready and _relay(relay, out) == 0:
                watched.remove(relay)
            if pidfd in ready:
                # the pid namespace is gone, and with it the pipe's writers: copy what they left (not
                # waiting for end of file: a descriptor sent over a socket may outlive them)
                while relay in watched and _relay(relay, out) > 0:
                    pass
                return os.waitpid(pid, 0)[1]
    finally:
        if main:
            signal.set_wakeup_fd(old)
        for fd in (rfd, wfd, pidfd):
            os.close(fd)


def _settable_groups(groups: list[int]) -> list[int] | None:
    """The supplementary groups this user namespace can hold, or None where setgroups(2) is denied.

    A single-id map (no subgid range) is written with setgroups denied, so the RUN keeps the groups
    the builder started with; groups the map does not hold are left out (their files show as nogroup).
    """
    try:
        with open("/proc/self/setgroups") as f:
            if f.read().strip() == "deny":
                return None
        with open("/proc/self/gid_map") as f:
            ranges = [[int(x) for x in ln.split()] for ln in f if ln.strip()]
    except OSError:
        return groups
    return [g for g in groups if any(start <= g < start + count for start, _, count in ranges)]


class _SharedPid:
    """Whether RUNs of this build share its pid namespace: set once a fresh /proc was refused.

    The kernel refuses a new procfs in a user namespace when the visible /proc has mounts over parts of
    it (runc's masked paths in a container). Then, as BuildKit's --oci-worker-no-process-sandbox does,
    the RUN keeps the builder's pid namespace and sees its /proc (masks included, bound recursively): lost
    is the RUN's own pid space (it sees and may signal the builder's other processes of its uid), not the
    mount, ipc or uts isolation. Processes it leaves behind are still ended (runinit is their subreaper).
    """

    shared = False


def _spawn_run(root: str, spec: RunSpec, files: dict[str, str], log: Callable[[str], None] | None) -> int:
    """Start runinit.py as a new program in a new session, hand it the plan, wait; the RUN's status."""
    try:
        return _spawn_once(root, spec, files, log, _SharedPid.shared)
    except _NoFreshProc as e:
        _SharedPid.shared = True
        if log is not None:
            log(f"RUN sandbox: {e}; RUN steps share the builder's pid namespace and its /proc from now on")
        return _spawn_once(root, spec, files, log, True)


class _NoFreshProc(Exception):
    """The sandbox could not mount a fresh /proc (nothing of the RUN ran yet: it can be started again)."""


def _spawn_once(
    root: str, spec: RunSpec, files: dict[str, str], log: Callable[[str], None] | None, shared_pid: bool
) -> int:
    import marshal
    import subprocess

    from rootless.sandbox import seccomp

    errr, errw = os.pipe2(os.O_CLOEXEC)
    specr, specw = os.pipe2(os.O_CLOEXEC)
    sup = None
    notify = (-1, 0)
    if spec.emulate:
        import socket

        from rootless.sandbox import notify as notify_mod

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        creds = notify_mod.Creds.of(spec.uid, spec.gid, spec.groups)
        sup = notify_mod.Supervisor(ours, creds, spec.lowers, spec.upper, records=spec.records)
        notify = (theirs.detach(), seccomp.syscall_number("seccomp"))
    groups = None if spec.emulate else _settable_groups(spec.groups)
    program = seccomp.program(spec.emulate)
    if spec.namespaces:
        ops = plan(spec, files, groups, program, seccomp.syscall_number("keyctl"), notify, fresh_proc=not shared_pid)
    else:
        ops = plan_chroot(spec, groups, program, seccomp.syscall_number("keyctl"))
    if log is not None:
        for op in ops:
            log("RUN sandbox: " + describe(op))
    relay_r = relay_w = -1
    if spec.stdio is None and (spec.output is not None or os.isatty(spec.output_fd)):  # a pipe, never the terminal
        relay_r, relay_w = os.pipe2(os.O_CLOEXEC)
    sink = spec.output or functools.partial(_write_all, spec.output_fd)
    out = relay_w if relay_w >= 0 else spec.output_fd
    stdio: tuple[int, int, int] = spec.stdio or (subprocess.DEVNULL, out, out)
    passed = (spec.terminal_socket,) if spec.terminal_socket >= 0 else ()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # RUN output goes to stderr: stdout is reserved for the image id; the new session leaves the
        # caller's process group and controlling terminal behind; only the pipes are passed on
        proc = subprocess.Popen(
            [sys.executable, "-S", "-I", _RUNINIT, str(specr)],
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            pass_fds=(specr, errw) + ((notify[0],) if notify[0] >= 0 else ()) + passed,
            start_new_session=True,
        )
    except OSError as e:
        for fd in (errr, errw, specr, specw, relay_r, relay_w, notify[0]):
            if fd >= 0:
                os.close(fd)
        if sup is not None:
            sup.stop()
        raise RbuildError(f"cannot start the RUN sandbox ({sys.executable}): {e.strerror}") from None
    for fd in (errw, specr, relay_w, notify[0]):
        if fd >= 0:
            os.close(fd)
    if sup is not None:
        sup.start()
    try:
        with open(specw, "wb") as f:
            f.write(
                marshal.dumps(
                    {
                        "parent": os.getpid(),
                        "errfd": errw,
                        "root": root,
                        "ops": ops,
                        "share_pid": shared_pid,
                        "namespaces": spec.namespaces,
                        "netns": spec.network == "none",
                    }
                )
            )
    except BrokenPipeError:
        pass  # runinit is gone already; its status and message say why
    if relay_r >= 0:
        os.set_blocking(relay_r, False)
    try:
        status = _wait_interruptibly(proc.pid, relay_r, sink, spec.cancel_fd)
        proc.returncode = os.waitstatus_to_exitcode(status)
    except BaseException:
        with contextlib.suppress(OSError):
            proc.terminate()  # runinit kills the pid namespace's init, then exits
            proc.wait()
        raise
    finally:
        if sup is not None:
            sup.stop()
            spec.warnings += sup.warnings
            if log is not None:
                parts = [
                    f"{who}: " + ", ".join(f"{n} {c}" for n, c in sorted(calls.items(), key=lambda t: -t[1]))
                    for who, calls in (("rbuild-notify", sup.front_calls), ("Python", sup.calls))
                    if calls
                ]
                total = sum(sup.calls.values()) + sum(sup.front_calls.values())
                log(f"RUN supervisor: {total} system calls answered ({'; '.join(parts)})")
        msg = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(errr, 4096):
                msg += chunk
        os.close(errr)
        if relay_r >= 0:
            os.close(relay_r)
    if sup is not None and sup.errors:
        raise RbuildError("RUN: single-uid emulation failed: " + "; ".join(sorted(set(sup.errors))))
    if msg:
        code, _, text = msg.decode(errors="replace").partition(" ")
        if code == "exec":  # the RUN's program could not be started (its own exit 127 is no message)
            raise RbuildError("RUN: " + msg.decode(errors="replace"))
        if code == "noproc" and not shared_pid:
            raise _NoFreshProc(text)
        raise RbuildError(f"cannot set up the RUN sandbox: {text}")
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
