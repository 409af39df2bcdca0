"""Running a RUN step: new mount, pid, ipc and uts namespaces of the build's user namespace.

The build process (already uid 0 in the user namespace) forks; the child leaves the caller's session
and process group, unshares the namespaces and forks pid 1 of the new pid namespace. That process
starts a session of its own (so no terminal is its controlling terminal and no signal reaches the
caller's process group), joins a fresh session keyring, builds the container's view (/proc with
docker's masked paths, a minimal /dev, read-only /sys, /etc/hosts, /etc/hostname, /etc/resolv.conf),
pivots into the merged tree, drops to docker's default capability bounding set, sets no_new_privs,
closes every inherited file descriptor but 0-2, installs the seccomp filter and execs.
When rbuild's output is a terminal, the RUN writes into a pipe that rbuild copies to it, as docker
and buildah do: a RUN never holds a descriptor of the user's terminal.
Mount points that had to be created in the tree are removed again afterwards, so they leave no trace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import sys
from dataclasses import dataclass, field

from rootless import linux
from rootless.errors import RbuildError
from rootless.fspath import secure_join

# docker's default capabilities: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
# NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP
DEFAULT_CAPS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31)
MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# host device nodes bound into /dev, each only if it is that very device (major, minor). /dev/tty
# (5, 0) opens the opener's controlling terminal, and a RUN has none (its own session): ENXIO.
DEV_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOSTNAME = "rbuild"


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
    output_fd: int = 2  # where the step's stdout and stderr go
    dev_files: dict[str, str] = field(default_factory=dict)  # /dev/NAME -> host file, bound read-only
    mounts: list[MountSpec] = field(default_factory=list)


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


def resolve_user(root: str, spec: str) -> User:
    """docker's USER semantics: name or uid, optional :group; names looked up in the image's files."""
    user, _, group = (spec or "0").partition(":")
    passwd = _read_db(root, "passwd")
    entry = None
    if user.isdigit():
        uid = int(user)
        entry = next((e for e in passwd if len(e) >= 7 and e[2] == user), None)
    else:
        entry = next((e for e in passwd if len(e) >= 7 and e[0] == user), None)
        if entry is None:
            raise RbuildError(f"unable to find user {user}: no matching entries in passwd file")
        uid = int(entry[2]) if entry[2].isdigit() else 0
    gid = int(entry[3]) if entry and entry[3].isdigit() else 0
    home = entry[5] if entry else "/"
    if uid == 0 and not entry:
        home = "/root"
    groupdb = _read_db(root, "group")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((e for e in groupdb if len(e) >= 3 and e[0] == group and e[2].isdigit()), None)
            if g is None:
                raise RbuildError(f"unable to find group {group}: no matching entries in group file")
            gid = int(g[2])
        member: set[int] = set()
    else:
        name = entry[0] if entry else None
        member = {int(e[2]) for e in groupdb if len(e) >= 4 and e[2].isdigit() and name and name in e[3].split(",")}
    # supplementary groups: the groups /etc/group lists the user in, and the primary group (buildah and
    # docker both add it); an explicit group stands alone
    return User(uid, gid, sorted(member | {gid}), home)


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
                elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
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


def _try(fn: object, *args: object) -> bool:
    try:
        fn(*args)  # type: ignore[operator]
        return True
    except OSError:
        return False


def _readonly_tree(top: str) -> None:
    """Make a bind-mounted tree and every mount below it read-only (keeping their locked flags)."""
    with open("/proc/self/mountinfo") as f:
        points = [ln.split()[4].replace("\\040", " ") for ln in f]
    for point in [p for p in points if p == top or p.startswith(top + "/")]:
        flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
        try:
            st = os.statvfs(point)
        except OSError:
            continue
        for bit, flag in ((os.ST_NOSUID, linux.MS_NOSUID), (os.ST_NODEV, linux.MS_NODEV),
                          (os.ST_NOEXEC, linux.MS_NOEXEC)):
            if st.f_flag & bit:
                flags |= flag
        _try(linux.mount, None, point, None, flags)


def _host_device(name: str) -> bool:
    try:
        st = os.stat("/dev/" + name)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == DEV_NODES[name]


def _setup_and_exec(root: str, spec: RunSpec, files: dict[str, str], groups: list[int] | None, filter_: bytes,
                    errw: int) -> None:
    """In pid 1 of the new namespaces: build the container view and exec. Never returns.

    groups: the supplementary groups to set, None to keep the builder's (see _settable_groups);
    filter_: the compiled seccomp program.
    """
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setsid()  # no controlling terminal; `kill 0` reaches only the RUN's own processes
        try:
            linux.join_session_keyring()  # the caller's keys stay out of reach
        except OSError as e:
            if e.errno != errno.ENOSYS:  # a kernel without keyrings has nothing to leak (runc's rule)
                raise
        linux.sethostname(spec.hostname)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        nosuid = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
        proc = secure_join(root, "/proc")
        try:
            linux.mount("proc", proc, "proc", nosuid)
        except OSError as e:  # never fall back to the host's /proc: it would show every host process
            raise RbuildError(f"cannot mount a fresh /proc for RUN ({e.strerror}); is /proc partly masked where "
                              "rbuild runs (as in an unprivileged container)?") from None
        dev = secure_join(root, "/dev")
        linux.mount("tmpfs", dev, "tmpfs", linux.MS_NOSUID, "mode=755,size=65536k")
        for name in DEV_NODES:
            if _host_device(name):
                target = os.path.join(dev, name)
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o666))
                _try(linux.mount, "/dev/" + name, target, None, linux.MS_BIND)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2"), ("core", "/proc/kcore"), ("ptmx", "pts/ptmx")):
            os.symlink(target, os.path.join(dev, name))
        for path, source in spec.dev_files.items():
            target = os.path.join(dev, os.path.basename(path))
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o755))
            linux.mount(source, target, None, linux.MS_BIND)
        os.mkdir(os.path.join(dev, "pts"), 0o755)
        if not _try(linux.mount, "devpts", os.path.join(dev, "pts"), "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                    "newinstance,ptmxmode=0666,mode=0620,gid=5"):
            _try(linux.mount, "devpts", os.path.join(dev, "pts"), "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620")
        os.mkdir(os.path.join(dev, "shm"), 0o1777)
        linux.mount("shm", os.path.join(dev, "shm"), "tmpfs", nosuid, "mode=1777,size=65536k")
        os.mkdir(os.path.join(dev, "mqueue"), 0o755)
        _try(linux.mount, "mqueue", os.path.join(dev, "mqueue"), "mqueue", nosuid)
        sys_dir = secure_join(root, "/sys")
        if _try(linux.mount, "/sys", sys_dir, None, linux.MS_BIND | linux.MS_REC):
            _readonly_tree(sys_dir)
        for path, source in files.items():
            linux.mount(source, secure_join(root, path), None, linux.MS_BIND)
        for m in spec.mounts:
            target = secure_join(root, m.target)
            if m.kind == "tmpfs":
                opts = "mode=1777" + (f",size={m.size}" if m.size else "")
                linux.mount("tmpfs", target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, opts)
                continue
            linux.mount(m.source, target, None, linux.MS_BIND | linux.MS_REC)
            if m.readonly:
                linux.mount(None, target, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
        # masks and read-only parts of /proc and /sys
        for path in MASKED_PATHS:
            host = secure_join(root, path)
            if os.path.isdir(host) and not os.path.islink(host):
                _try(linux.mount, "tmpfs", host, "tmpfs", linux.MS_RDONLY | nosuid, "size=0")
            elif os.path.exists(host):
                _try(linux.mount, "/dev/null", host, None, linux.MS_BIND)
        for path in READONLY_PATHS:
            host = secure_join(root, path)
            if os.path.exists(host) and _try(linux.mount, host, host, None, linux.MS_BIND | linux.MS_REC):
                _try(linux.mount, None, host, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | nosuid)
        os.chdir(root)
        linux.pivot_root(".", ".")
        linux.umount(".", linux.MNT_DETACH)
        os.chdir("/")
        try:
            os.chdir(spec.cwd)
        except OSError as e:
            raise RbuildError(f"cannot change to working directory {spec.cwd}: {e.strerror}") from None
        for cap in range(linux.last_cap() + 1):
            if cap not in DEFAULT_CAPS:
                _try(linux.prctl, linux.PR_CAPBSET_DROP, cap)
        _try(linux.prctl, linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        if groups is not None:
            os.setgroups(groups)
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # changing credentials cleared it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        env = dict(spec.env)
        env.setdefault("PATH", DEFAULT_PATH)
        # only 0-2 reach the RUN: a descriptor rbuild's caller left open (a directory, a socket) would
        # lead out of the sandbox. errw is close-on-exec; it reports a failed exec. (/proc is the RUN's.)
        for fd in [int(n) for n in os.listdir("/proc/self/fd")]:
            if fd > 2 and fd != errw:
                with contextlib.suppress(OSError):  # the listing's own descriptor is already gone
                    os.close(fd)
        linux.seccomp_filter(filter_)
        try:
            os.execvpe(spec.argv[0], spec.argv, env)
        except OSError as e:
            os.write(errw, f"exec {spec.argv[0]}: {e.strerror}".encode())
            os._exit(127)
    except (OSError, RbuildError) as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError) and e.filename:
            msg = f"{msg}: {e.filename}"
        with contextlib.suppress(OSError):
            os.write(errw, f"125 {msg}".encode())
        os._exit(125)
    except BaseException as e:  # noqa: BLE001 - must never return into the builder's code
        with contextlib.suppress(OSError):
            os.write(errw, f"125 {type(e).__name__}: {e}".encode())
        os._exit(125)


def run(root: str, spec: RunSpec, scratch: str, touched: list[str] | None = None) -> int:
    """Run spec in the tree mounted at root; return the exit status. scratch: a private temp dir.

    Existing directories in which mount points had to be created are appended to `touched` (as
    container paths): an overlay copied them up, and the caller may drop those copies again.
    """
    if not spec.argv:
        raise RbuildError("RUN has no command")
    stubs = _Stubs(root)
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
        return _fork_run(root, spec, files)
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


def _relay(src: int, dst: int) -> int:
    """Copy what is waiting in pipe src to dst; return the bytes copied, 0 at end of file, -1 if none."""
    try:
        data = os.read(src, 65536)
    except BlockingIOError:
        return -1
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(dst, view):]
        except OSError:  # the terminal went away: the RUN's output is dropped, the RUN goes on
            break
    return len(data)


def _wait_interruptibly(pid: int, relay: int, out: int) -> int:
    """waitpid that Ctrl-C and SIGTERM always interrupt, copying the RUN's output from `relay` (if >= 0).

    A signal may be delivered to any thread of the builder (layer and registry code use worker threads);
    then a main thread blocked in waitpid would never see it until the RUN ends. The signal module's
    wakeup fd is written whichever thread takes the signal, so waiting on it and on a pidfd together
    hands the signal to the main thread's Python handler at once.
    """
    import select

    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    pidfd = os.pidfd_open(pid)
    old = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    watched = [pidfd, rfd] + ([relay] if relay >= 0 else [])
    try:
        while True:
            ready, _, _ = select.select(watched, [], [])
            if rfd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(rfd, 512)  # the Python handler (KeyboardInterrupt) runs right after select
            if relay in ready and _relay(relay, out) == 0:
                watched.remove(relay)
            if pidfd in ready:
                # the pid namespace is gone, and with it the pipe's writers: copy what they left (not
                # waiting for end of file: a descriptor sent over a socket may outlive them)
                while relay in watched and _relay(relay, out) > 0:
                    pass
                return os.waitpid(pid, 0)[1]
    finally:
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


def _fork_run(root: str, spec: RunSpec, files: dict[str, str]) -> int:
    from rootless import seccomp

    filter_ = seccomp.program()  # compiled once per build process; each RUN only installs it
    groups = _settable_groups(spec.groups)
    relay_r = relay_w = -1
    if os.isatty(spec.output_fd):  # the RUN gets a pipe to it, never the terminal itself
        relay_r, relay_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    errr, errw = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()  # out of the caller's session and process group, with no controlling terminal
            os.close(errr)
            devnull = os.open("/dev/null", os.O_RDONLY)
            os.dup2(devnull, 0)
            if relay_w >= 0:
                os.set_blocking(relay_w, True)
                os.dup2(relay_w, 2)
            elif spec.output_fd != 2:
                os.dup2(spec.output_fd, 2)
            os.dup2(2, 1)  # RUN output goes to stderr: stdout is reserved for the image id
            linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
            inner = os.fork()
            if inner == 0:
                _setup_and_exec(root, spec, files, groups, filter_, errw)
            os.close(errw)
            signal.signal(signal.SIGINT, signal.SIG_IGN)

            def end(signum: int, frame: object) -> None:  # pid 1 dies -> its whole pid namespace dies
                os.kill(inner, signal.SIGKILL)

            # the RUN itself may drop its own death signal; this process (never the RUN's) keeps it
            signal.signal(signal.SIGTERM, end)
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)
            _, status = os.waitpid(inner, 0)
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        except BaseException as e:  # noqa: BLE001
            with contextlib.suppress(OSError):
                os.write(errw, f"125 {e}".encode())
            os._exit(125)
    os.close(errw)
    if relay_w >= 0:
        os.close(relay_w)
    try:
        status = _wait_interruptibly(pid, relay_r, spec.output_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)  # the intermediate kills the pid namespace's init, then exits
            os.waitpid(pid, 0)
        raise
    finally:
        msg = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(errr, 4096):
                msg += chunk
        os.close(errr)
        if relay_r >= 0:
            os.close(relay_r)
    if msg:
        code, _, text = msg.decode(errors="replace").partition(" ")
        if code == "exec":  # the RUN's program could not be started (its own exit 127 is no message)
            raise RbuildError("RUN: " + msg.decode(errors="replace"))
        raise RbuildError(f"cannot set up the RUN sandbox: {text}")
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
