"""The RUN sandbox's setup, carried out in a fresh process: `python -S -I runinit.py FD`.

The builder may have threads (layer and registry workers), and a fork of a threaded process may
find a lock held forever; so no Python runs in a fork of it. The builder starts this file as a new
program in a new session (subprocess: fork and exec in C) and writes the RUN's spec, a marshal'ed
dict with the ordered list of operations sandbox.plan() made, into FD (marshal: the builder made the
data, and json's import alone cost 8 ms a RUN). This process unshares the mount,
pid, ipc and uts namespaces, forks pid 1 of the new pid namespace (itself single-threaded, so that
fork is safe), which carries out the operations in order and ends by exec'ing the RUN's command.

Paths in the tree are container paths, resolved (fspath.secure_join) when their operation runs: a
mount made earlier, or the fresh /proc, may change what a path leads to. Isolated mode puts no
directory on sys.path, so the directory holding the rootless package is appended (after the standard
library). Besides rootless.kernel.linux and rootless.kernel.fspath, only built-in modules and ctypes are imported
(signal.py, contextlib and json would pull in enum, functools and re: 5-10 ms for every RUN); _signal
is the C module behind signal. Errors go to the spec's error descriptor as one line: "125 MESSAGE"
for the sandbox, "exec MESSAGE" when the command cannot be started.
"""

from __future__ import annotations

import errno
import marshal
import os
import select
import sys
import warnings  # noqa: F401 - os.execvpe imports it, and after pivot_root the standard library is gone

TYPE_CHECKING = False  # typing itself is not imported: it costs milliseconds per RUN; mypy reads this as True
if TYPE_CHECKING:
    import signal  # the same names, with types (typeshed has no stub for _signal)
    from typing import Any
else:
    import _signal as signal

sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from rootless.errors import RbuildError  # noqa: E402 - needs the path above
from rootless.kernel import fspath, linux  # noqa: E402 - needs the path above

_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441
_TIOCSCTTY = 0x540E


class SetupError(Exception):
    """A step of the setup failed; the message is reported to the builder as it is."""


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
        for bit, flag in (
            (os.ST_NOSUID, linux.MS_NOSUID),
            (os.ST_NODEV, linux.MS_NODEV),
            (os.ST_NOEXEC, linux.MS_NOEXEC),
        ):
            if st.f_flag & bit:
                flags |= flag
        _try(linux.mount, None, point, None, flags)


def _empty_file(path: str, mode: int) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode))


def _op(op: list[Any], root: str, errw: int) -> None:
    """Carry out one operation of sandbox.plan()'s list in the tree at root (see describe() there)."""
    name, args = op[0], op[1:]
    nosuid = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC

    def tree(path: str) -> str:  # a container path's host path, as things stand now
        return fspath.secure_join(root, path)

    if name == "setsid":
        os.setsid()
    elif name == "keyring":
        try:
            linux.join_session_keyring(args[0])
        except OSError as e:
            if e.errno != errno.ENOSYS:  # a kernel without keyrings has nothing to leak (runc's rule)
                raise
    elif name == "hostname":
        linux.sethostname(args[0])
    elif name == "interface-up":
        linux.interface_up(args[0])
    elif name == "private":
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    elif name == "root-mount":
        if not os.path.ismount(root):
            linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)
    elif name == "proc":
        try:
            linux.mount("proc", tree(args[0]), "proc", nosuid)
        except OSError as e:  # never the builder's /proc in a new pid namespace: the builder asks for a
            _report(errw, f"noproc cannot mount a fresh /proc ({e.strerror})")  # shared one instead
    elif name == "proc-bind":  # the pid namespace is the builder's: its /proc, with what masks it
        linux.mount("/proc", tree(args[0]), None, linux.MS_BIND | linux.MS_REC)
    elif name == "mount":
        source, target, fstype, flags, data, required = args
        if required:
            linux.mount(source, tree(target), fstype, flags, data)
        else:
            _try(linux.mount, source, tree(target), fstype, flags, data)
    elif name == "restrict-bind":  # a RUN --mount bind: nosuid and nodev (read-only when asked), keeping
        target, readonly = tree(args[0]), args[1]  # what its source mount locks
        flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID | linux.MS_NODEV
        st = os.statvfs(target)
        if readonly or st.f_flag & os.ST_RDONLY:
            flags |= linux.MS_RDONLY
        if st.f_flag & os.ST_NOEXEC:
            flags |= linux.MS_NOEXEC
        linux.mount(None, target, None, flags)
    elif name == "device":
        source, target = args
        _empty_file(tree(target), 0o666)
        _try(linux.mount, source, tree(target), None, linux.MS_BIND)
    elif name == "bind-file":
        source, target = args
        _empty_file(tree(target), 0o755)
        linux.mount(source, tree(target), None, linux.MS_BIND)
    elif name == "symlink":
        os.symlink(args[0], tree(args[1]))
    elif name == "mkdir":
        os.mkdir(tree(args[0]), args[1])
    elif name == "devpts":
        flags = linux.MS_NOSUID | linux.MS_NOEXEC
        if not _try(linux.mount, "devpts", tree(args[0]), "devpts", flags, "newinstance,ptmxmode=0666,mode=0620,gid=5"):
            _try(linux.mount, "devpts", tree(args[0]), "devpts", flags, "newinstance,ptmxmode=0666,mode=0620")
    elif name == "sys":
        if _try(linux.mount, "/sys", tree(args[0]), None, linux.MS_BIND | linux.MS_REC):
            _readonly_tree(tree(args[0]))
    elif name == "mask":
        path = tree(args[0])
        if os.path.isdir(path) and not os.path.islink(path):
            _try(linux.mount, "tmpfs", path, "tmpfs", linux.MS_RDONLY | nosuid, "size=0")
        elif os.path.exists(path):
            _try(linux.mount, "/dev/null", path, None, linux.MS_BIND)
    elif name == "readonly":
        path = tree(args[0])
        if os.path.exists(path) and _try(linux.mount, path, path, None, linux.MS_BIND | linux.MS_REC):
            _try(linux.mount, None, path, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | nosuid)
    elif name == "chroot":  # no mount namespace: the tree is only a view (see sandbox.plan_chroot)
        os.chdir(root)
        os.chroot(".")
    elif name == "pivot-root":
        os.chdir(root)
        linux.pivot_root(".", ".")
        linux.umount(".", linux.MNT_DETACH)
        os.chdir("/")
    elif name == "chdir":
        try:
            os.chdir(args[0])
        except OSError as e:
            raise SetupError(f"cannot change to working directory {args[0]}: {e.strerror}") from None
    elif name == "terminal":  # rbuild run -t: a terminal of the container's own devpts, its master to rbuild
        sock, uid = args
        fcntl = sys.modules["fcntl"]  # imported by main() while the standard library was reachable
        _socket = sys.modules["_socket"]
        master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        fcntl.ioctl(master, _TIOCSPTLCK, bytes(4))  # unlock the slave
        slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
        if uid >= 0:
            os.fchown(slave, uid, -1)
        s = _socket.socket(fileno=sock)
        s.sendmsg([b"T"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, master.to_bytes(4, sys.byteorder))])
        s.close()
        os.close(master)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        if slave > 2:
            os.close(slave)
        fcntl.ioctl(0, _TIOCSCTTY, 0)  # the command's controlling terminal (this process leads its session)
    elif name == "capabilities":
        keep = set(args[0])
        for cap in range(linux.last_cap() + 1):
            if cap not in keep:
                _try(linux.prctl, linux.PR_CAPBSET_DROP, cap)
        _try(linux.prctl, linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    elif name == "no-new-privs":
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    elif name == "groups":
        os.setgroups(args[0])
    elif name == "ids":
        uid, gid = args
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # changing credentials cleared it
    elif name == "close-fds":
        keep = {errw, *args[0]}
        if not os.path.isdir("/proc/self/fd"):  # chroot'ed without /proc: every number but those kept
            low = 3
            for fd in sorted(keep):
                os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, os.sysconf("SC_OPEN_MAX"))
            return
        for fd in [int(n) for n in os.listdir("/proc/self/fd")]:
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)
                except OSError:  # the listing's own descriptor is already gone
                    pass
    elif name == "seccomp":
        program, sock, nr = args
        if sock < 0:
            linux.seccomp_filter(program)
        else:  # single uid: the listener goes to the builder's supervisor (sandbox.notify), not the RUN
            listener = linux.seccomp_listener(program, nr)
            _socket = sys.modules["_socket"]  # imported by main() while the standard library was reachable
            s = _socket.socket(fileno=sock)
            s.sendmsg([b"L"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, listener.to_bytes(4, sys.byteorder))])
            s.close()
            os.close(listener)
    elif name == "exec":
        argv, env = args
        # a RUN starts with every signal at its default, none blocked: Python ignores SIGPIPE and
        # SIGXFSZ, and rbuild's caller may have ignored others (a shell's background job: SIGINT, SIGQUIT)
        for sig in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(errw, f"exec {argv[0]}: {e.strerror}".encode())
            os._exit(127)
    else:
        raise SetupError(f"unknown sandbox operation {name!r}")


def _init(root: str, ops: list[list[Any]], errw: int, alive: int) -> None:
    """pid 1 of the new namespaces: the operations in order, the last one exec's. Never returns.

    `alive`: a pipe whose write end only the parent holds, readable (at EOF) once the parent is gone.
    """
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([alive], [], [], 0)[0]:  # the parent died before the death signal was armed
            os._exit(125)
        os.close(alive)
        for op in ops:
            _op(op, root, errw)
        raise SetupError("the operations end without exec")
    except (OSError, SetupError, RbuildError) as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError) and e.filename:
            msg = f"{msg}: {e.filename}"
        _report(errw, f"125 {msg}")
    except BaseException as e:  # noqa: BLE001 - report anything, never return
        _report(errw, f"125 {type(e).__name__}: {e}")


def _report(errw: int, line: str) -> None:
    try:
        os.write(errw, line.encode())
    finally:
        os._exit(125)


def main() -> None:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)
    with open(int(sys.argv[1]), "rb") as f:
        data = f.read()
    if not data:  # the builder was interrupted before it handed the plan over: nothing to run, nothing to say
        os._exit(125)
    spec = marshal.loads(data)
    if os.getppid() != spec["parent"]:  # the builder died before the death signal was set
        os._exit(125)
    terminal = any(op[0] == "terminal" for op in spec["ops"])
    if terminal or any(op[0] == "seccomp" and op[2] >= 0 for op in spec["ops"]):
        import _socket  # noqa: F401 - the C module behind socket (whose import pulls in enum); only when needed
    if terminal:
        import fcntl  # noqa: F401 - for the terminal's ioctls, after pivot_root
    errw = spec["errfd"]
    os.set_inheritable(errw, False)  # it must not reach the RUN; a failed exec still writes to it
    shared = spec.get("share_pid", False)
    try:
        pid_ns = 0 if shared else linux.CLONE_NEWPID
        if spec.get("namespaces", True):
            net_ns = linux.CLONE_NEWNET if spec.get("netns") else 0
            linux.unshare(linux.CLONE_NEWNS | pid_ns | net_ns | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
        if shared:  # no pid namespace ends what the RUN leaves behind: orphans come back to this process
            linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    except OSError as e:
        os.write(errw, f"125 {e.strerror}".encode())
        os._exit(125)
    inner = 0

    def end(signum: int, frame: object) -> None:  # pid 1 dies -> its whole pid namespace dies
        if inner:
            os.kill(inner, signal.SIGKILL)
        else:
            os._exit(128 + signum)

    # the RUN itself may drop its own death signal; this process (never the RUN's) keeps it. The
    # handler is there before the fork, so no SIGTERM can end this process and leave pid 1 behind.
    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGHUP, end)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children = -1
    if shared:
        me = os.getpid()
        children = os.open(f"/proc/{me}/task/{me}/children", os.O_RDONLY | os.O_CLOEXEC)
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)  # at EOF for pid 1 once this process is gone
    inner = os.fork()
    if inner == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.close(alive_w)
        _init(spec["root"], spec["ops"], errw, alive_r)
    os.close(alive_r)
    os.close(errw)
    _, status = os.waitpid(inner, 0)
    if children >= 0:
        _end_descendants(children)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _end_descendants(children: int) -> None:
    """Kill and reap every process the RUN left behind (they were reparented to this subreaper).

    `children`: this process's /proc/PID/task/PID/children, opened before the RUN could touch /proc.
    """
    while True:
        try:
            kids = [int(k) for k in os.pread(children, 1 << 16, 0).split()]
        except OSError:
            kids = []
        for kid in kids:
            _try(os.kill, kid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


if __name__ == "__main__":
    main()
