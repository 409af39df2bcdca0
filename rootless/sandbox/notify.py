"""The supervisor of a single-uid RUN: answers the system calls its seccomp filter hands over.

A user namespace that maps one uid cannot chown to another id, make a device node, or switch ids. The
RUN's filter (seccomp.program(emulate=True)) turns those calls, and every setxattr, into
SECCOMP_RET_USER_NOTIF; runinit sends the listener fd here over a socket (SCM_RIGHTS). This thread, in
the builder (outside the RUN's namespaces, same user namespace), answers each call as root would have
in a namespace with every id, and records the result the way layers.py keeps what a single uid cannot
hold: ``user.rbuild.stat`` / ``user.rbuild.lstat`` owners, ``user.rbuild.dev`` devices (write_tar turns
them back into tar entries). setxattr is done here for the RUN (from the bytes read once, so another
thread of the RUN cannot change them after the check), and ``user.rbuild.*`` is never written (the
call succeeds, as in a build with a subuid range, whose commit drops such a record): the only
records in the RUN's upper dir came from the lowers or from here, so the commit keeps them
(layers.normalize(sealed=True)).

Paths are resolved as the calling process sees them: relative to its cwd or dirfd (their paths read from
/proc/PID/cwd and /proc/PID/fd, which show paths in the RUN's root), with openat2(RESOLVE_IN_ROOT) from
/proc/PID/root, so neither a symlink nor ".." leads outside the RUN's tree, and the entry found is checked
to be the very inode the call meant. Memory is read through /proc/PID/mem, and the notification is checked
to be still valid (SECCOMP_IOCTL_NOTIF_ID_VALID) afterwards: the pid may have been reused meanwhile.

The process ids are emulated: the RUN runs as the one mapped uid (0 in the namespace); set*id change
the emulated ids with the kernel's permission rules (per thread group, inherited by children that did
not change their own), and get*id answer with them (apt checks that its switch to _apt took). In a
root RUN where no process switched ids, the kernel answers get*id at once (busybox calls getuid in every
process). What cannot be emulated exactly is reported in `warnings` (the builder prints it, naming the
instruction): a process that switched to another uid still has root's permissions, and what it creates
is recorded as USER's.

stat is answered with the records (ls -l, find -user, cp -a and busybox chown see recorded owners); while
no entry of the RUN's tree can hold a record (none in the lowers, none made yet, USER root) the kernel
answers it at once, without a look at the path. The round trip stays: a filter cannot be changed from
outside once the RUN runs (SYNC_WAKE_UP keeps it short). Symlinks' and fifos' owners come from their
parent's lstat record (the upper dir's first). Not emulated: 32-bit ABIs' struct stat, 16-bit-id
getres*id and *groups of old i386 programs. See docs/differences.md.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import posixpath
import select
import socket
import stat
import struct
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from rootless.kernel.fspath import open_beneath, open_in_root
from rootless.layer import layers
from rootless.layer.ownership import Ownership
from rootless.sandbox.notifyhelper import helper_path

_RECV = 0xC0502100  # SECCOMP_IOCTL_NOTIF_RECV: _IOWR('!', 0, struct seccomp_notif)
_SEND = 0xC0182101  # SECCOMP_IOCTL_NOTIF_SEND: _IOWR('!', 1, struct seccomp_notif_resp)
_ID_VALID = 0x40082102  # SECCOMP_IOCTL_NOTIF_ID_VALID: _IOW('!', 2, __u64)
_SET_FLAGS = 0x40082104  # SECCOMP_IOCTL_NOTIF_SET_FLAGS: _IOW('!', 4, __u64), Linux 6.6
_SYNC_WAKE_UP = 1  # SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: the waiting caller and this thread swap on one CPU
_NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, seccomp_data (nr, arch, ip, args)
_RESP = struct.Struct("=QqiI")  # id, val, error (negative errno), flags
_COUNTED = struct.Struct("=IIQ")  # rbuild-notify's final "C" message: (arch, nr, calls answered) each
_AUDIT_ARCH_I386 = 0x40000003
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000
NO_ID = 0xFFFFFFFF
_PATH_MAX = 4096
_XATTR_SIZE_MAX = 65536
_CHOWNS = ("chown", "fchown", "lchown", "fchownat")
_MKNODS = ("mknod", "mknodat")
_STATS = ("stat", "fstat", "lstat", "newfstatat", "statx")
_AUDIT_ARCH_X86_64 = 0xC000003E
_SYS = {"newfstatat": 262, "statx": 332}  # x86_64's numbers (the supervisor makes these calls itself)
CONTINUE = -(1 << 62)  # an answer meaning: the kernel carries the call out itself (FLAG_CONTINUE)


class _Answer(Exception):
    """The call's answer is this errno (raised anywhere in a handler)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Creds:
    """A process's emulated ids: [real, effective, saved, filesystem] user and group ids, groups."""

    uid: list[int]
    gid: list[int]
    groups: list[int]

    @classmethod
    def of(cls, uid: int, gid: int, groups: Sequence[int]) -> Creds:
        return cls([uid] * 4, [gid] * 4, list(groups))

    def copy(self) -> Creds:
        return Creds(list(self.uid), list(self.gid), list(self.groups))


@dataclass
class Supervisor:
    """Answers the notifications on `listener` in a thread until the RUN's processes are gone or `stop`.

    `user`: the RUN's USER (ids, groups); `lowers`: the RUN's lower layer dirs (top first), to tell what
    the RUN made (owned by USER) from what it found; `records`: whether they hold any owner or device
    record (None: looked up here). With `helper` (csrc/notify/'s rbuild-notify) a C process receives the
    notifications and answers the hot, simple ones itself (get*id while no process switched ids, a root
    USER's stat of regular files and directories, with their owner record); it forwards the others here
    over a socket, and this thread answers them on its own copy of the listener. It is told ("I", "R")
    before an answer that changes what it may answer. Without it (not built, or it cannot start) this
    thread answers every call.
    """

    sock: socket.socket  # runinit sends the listener fd over it, or closes it
    user: Creds
    lowers: Sequence[str]
    upper: str
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)  # system call name -> how many were answered here
    front_calls: dict[str, int] = field(default_factory=dict)  # ... by rbuild-notify
    _creds: dict[tuple[int, int], Creds] = field(default_factory=dict)
    _names: dict[tuple[int, int], str] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _stop: tuple[int, int] = (-1, -1)
    _records: bool = True  # some entry of the RUN's tree may hold a record (else stat needs no look)
    listener: int = -1
    records: bool | None = None
    helper: str | None = field(default_factory=helper_path)
    _ctl: socket.socket | None = None  # to rbuild-notify
    _front: subprocess.Popen[bytes] | None = None
    _front_used: bool = False  # rbuild-notify has the listener: what it received, only it answers
    _front_done: bool = False  # rbuild-notify sent its counts: it ended as it should

    def start(self) -> None:
        from rootless.sandbox import seccomp

        if self.records is None:
            self.records = any(_holds_records(d) for d in self.lowers)
        self._records = self.records
        self._names = seccomp.arch_numbers(seccomp.NOTIFIED + seccomp.GET_IDS + _MKNODS)
        self._stop = os.pipe2(os.O_CLOEXEC)
        if self.helper is not None:
            self._start_front(self.helper)
        self._thread = threading.Thread(target=self._loop, name="rbuild-notify", daemon=True)
        self._thread.start()

    def _start_front(self, helper: str) -> None:
        """Start rbuild-notify now, while the sandbox starts: it waits for the listener on the socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        argv = [helper, str(theirs.fileno()), str(self.user.uid[1]), str(self.user.gid[1]), str(int(self._records))]
        try:
            self._front = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
        except OSError:
            ours.close()  # this thread answers every call
        else:
            self._ctl = ours
        finally:
            theirs.close()

    def stop(self) -> None:
        """End the thread (the RUN is over: runinit holds the socket no more) and close the listener."""
        if self._ctl is not None:
            try:  # rbuild-notify sends its counts and ends; the thread ends when it is gone
                self._ctl.send(b"Q")
            except OSError:
                pass  # gone already
        if self._thread is not None:
            if self._ctl is not None:
                self._thread.join(10)
            if self._thread.is_alive():
                os.write(self._stop[1], b"x")
                self._thread.join()
            self._thread = None
        if self._front is not None:
            try:
                self._front.wait(5)
            except subprocess.TimeoutExpired:
                self._front.kill()
                self._front.wait()
            assert self._front.stderr is not None
            why = self._front.stderr.read().decode(errors="replace").strip()
            self._front.stderr.close()
            if self._front_used and not self._front_done:  # calls it received may have got no answer
                self.errors.append(f"rbuild-notify: {why or f'exit status {self._front.returncode}'}")
            self._front = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        self.sock.close()
        for fd in (*self._stop, self.listener):
            if fd >= 0:
                os.close(fd)
        self._stop, self.listener = (-1, -1), -1

    def _loop(self) -> None:
        try:
            _, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
        except OSError as e:
            self.errors.append(f"no seccomp listener from the sandbox: {e.strerror}")
            return
        finally:
            self.sock.close()
        if not fds:  # the sandbox failed before its filter was in place (it reports why)
            return
        self.listener = fds[0]
        try:  # without it each answer waits for this thread to be scheduled: 30-50 us a call here
            fcntl.ioctl(self.listener, _SET_FLAGS, _SYNC_WAKE_UP)
        except OSError:
            pass  # before Linux 6.6: slower, not wrong
        try:
            if self._ctl is not None:
                try:
                    socket.send_fds(self._ctl, [b"L"], [self.listener])
                    self._front_used = True
                except OSError:  # rbuild-notify did not start: every call is answered here
                    self._ctl.close()
                    self._ctl = None
            if self._ctl is not None:
                self._serve_front(self._ctl)
            else:
                self._serve()
        finally:  # no call of the RUN may wait for an answer that never comes: they get ENOSYS now
            os.close(self.listener)
            self.listener = -1

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        poller.register(self._stop[0], select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop[0] in events:
                return
            ev = events.get(self.listener, 0)
            if not ev & select.POLLIN:
                if ev & (select.POLLHUP | select.POLLERR):  # every process of the RUN is gone
                    return
                continue
            buf = bytearray(_NOTIF.size)
            try:
                fcntl.ioctl(self.listener, _RECV, buf)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):  # the caller died (or was killed) meanwhile
                    continue
                self.errors.append(f"seccomp notification: {e.strerror}")
                return
            self._handle(buf)

    def _serve_front(self, ctl: socket.socket) -> None:
        """Answer what rbuild-notify forwards until it ends (the RUN is over, or stop() said so)."""
        poller = select.poll()
        poller.register(ctl, select.POLLIN)
        poller.register(self._stop[0], select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop[0] in events:
                return
            try:
                msg = ctl.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                msg = b""
            if not msg:
                return  # rbuild-notify ended (stop() tells whether as it should)
            if len(msg) == _NOTIF.size:
                self._handle(msg)
            elif msg[:1] == b"C":
                self._front_done = True
                for arch, nr, n in _COUNTED.iter_unpack(msg[1:]):
                    name = self._names.get((arch, nr), "")
                    self.front_calls[name] = self.front_calls.get(name, 0) + n

    def _tell(self, what: bytes) -> None:
        """Tell rbuild-notify what changes its answers, before the answer of the call that changed it."""
        if self._ctl is not None:
            try:
                self._ctl.send(what)
            except OSError:
                pass  # it is gone: the calls it would answer wait for nobody (stop() reports it)

    def _handle(self, buf: bytes | bytearray) -> None:
        """Answer one notification (struct seccomp_notif)."""
        nid, pid, _, nr, arch, _, *args = _NOTIF.unpack(buf)
        name = self._names.get((arch, nr & 0xFFFFFFFF), "")
        self.calls[name] = self.calls.get(name, 0) + 1
        try:
            val, code = self._answer(nid, pid, arch, name, args), 0
        except _Answer as a:
            val, code = 0, a.code
        except OSError as e:  # what the kernel would say about the path (ENOENT, ENOTDIR, ELOOP...)
            val, code = 0, e.errno or errno.EIO
        except Exception as e:  # noqa: BLE001 - never leave the RUN waiting; the build fails after it
            self.errors.append(f"{name}: {type(e).__name__}: {e}")
            val, code = 0, errno.EIO
        try:
            resp = _RESP.pack(nid, 0, 0, 1) if val == CONTINUE else _RESP.pack(nid, val, -code, 0)
            fcntl.ioctl(self.listener, _SEND, resp)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the caller is gone (killed by a signal)
                self.errors.append(f"seccomp answer: {e.strerror}")

    def _valid(self, nid: int) -> None:
        """The call is still waiting: the pid was not reused while its memory and /proc were read."""
        try:
            fcntl.ioctl(self.listener, _ID_VALID, struct.pack("=Q", nid))
        except OSError:
            raise _Answer(errno.ESRCH) from None

    # -- dispatch ---------------------------------------------------------------------------------------
    def _answer(self, nid: int, pid: int, arch: int, name: str, args: list[int]) -> int:
        base = name.removesuffix("32")
        legacy = arch == _AUDIT_ARCH_I386 and not name.endswith("32")  # i386's 16-bit-id calls
        if base in _CHOWNS:
            return self._chown(nid, pid, base, args, legacy)
        if base in _MKNODS:
            return self._mknod(nid, pid, base, args)
        if base.endswith("setxattr"):
            return self._setxattr(nid, pid, base, args)
        if base.startswith(("get", "set")):
            return self._ids(nid, pid, base, args, legacy)
        if base in _STATS:
            return self._stat(nid, pid, arch, base, args)
        raise _Answer(errno.ENOSYS)

    # -- memory and paths -------------------------------------------------------------------------------
    def _read(self, pid: int, addr: int, size: int, string: bool) -> bytes:
        """`size` bytes (or a NUL-terminated string of at most `size`) at `addr` in the process."""
        if addr == 0:
            raise _Answer(errno.EFAULT)
        out = b""
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while len(out) < size:
                want = min(size - len(out), 4096 - (addr + len(out)) % 4096) if string else size - len(out)
                try:
                    chunk = os.pread(fd, want, addr + len(out))
                except OSError:
                    raise _Answer(errno.EFAULT) from None
                if not chunk:
                    raise _Answer(errno.EFAULT)
                if string and b"\0" in chunk:
                    return out + chunk[: chunk.index(b"\0")]
                out += chunk
        finally:
            os.close(fd)
        if string:
            raise _Answer(errno.ENAMETOOLONG)
        return out

    def _write(self, pid: int, addr: int, data: bytes) -> None:
        if addr == 0:
            raise _Answer(errno.EFAULT)
        fd = os.open(f"/proc/{pid}/mem", os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.pwrite(fd, data, addr) != len(data):
                raise _Answer(errno.EFAULT)
        except OSError:
            raise _Answer(errno.EFAULT) from None
        finally:
            os.close(fd)

    @staticmethod
    def _fd_path(pid: int, fd: int) -> bytes:
        link = os.fsencode(os.readlink(f"/proc/{pid}/cwd" if fd == _AT_FDCWD else f"/proc/{pid}/fd/{fd}"))
        if not link.startswith(b"/") or link.endswith(b" (deleted)"):
            raise _Answer(errno.ENOTDIR if fd != _AT_FDCWD else errno.ENOENT)
        return link

    def _entry(self, pid: int, dirfd: int, path: bytes | None, follow: bool) -> tuple[int, bytes] | None:
        """(fd of the parent directory, name) of the entry a call means, None when it is outside the tree.

        path None: the entry open as `dirfd` in the process (fchown, AT_EMPTY_PATH).
        """
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        tfd = -1
        try:
            if path is None:
                tfd = os.open(f"/proc/{pid}/fd/{dirfd}", os.O_PATH | os.O_CLOEXEC)  # the very file
            else:
                if not path:
                    raise _Answer(errno.ENOENT)
                full = path if path.startswith(b"/") else self._fd_path(pid, dirfd) + b"/" + path
                tfd = open_in_root(root, full, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
            st = os.fstat(tfd)
            if st.st_dev != os.fstat(root).st_dev:  # /dev, /proc, a RUN --mount: not in the image
                return None
            where = os.fsencode(os.readlink(f"/proc/self/fd/{tfd}"))  # its path in the RUN's root
            parent, name = posixpath.split(where)
            if not where.startswith(b"/") or where.endswith(b" (deleted)") or not name:
                return None  # the root itself, or unlinked: nothing of the image changes
            pfd = open_in_root(root, parent, os.O_RDONLY | os.O_DIRECTORY)
            now = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(pfd)
                raise _Answer(errno.EAGAIN)  # renamed under us by another process of the RUN
            return pfd, name
        finally:
            os.close(root)
            if tfd >= 0:
                os.close(tfd)

    # -- handlers ---------------------------------------------------------------------------------------
    def _record_dir(self, pfd: int, name: bytes) -> int | None:
        """The upper dir's copy of `pfd` when `name` is a symlink or fifo there (records name upper inodes).

        The merged view shows a copied-up entry with its lower inode number; the record must name the
        inode write_tar finds in the upper. The lchown through the merged view copies the entry up.
        """
        mode = os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            return None
        os.chown(name, 0, 0, dir_fd=pfd, follow_symlinks=False)
        where = os.readlink(f"/proc/self/fd/{pfd}")
        return open_beneath(self.upper, where)

    def _owner(self, pfd: int, name: bytes) -> tuple[int, int]:
        up = self._record_dir(pfd, name)
        try:
            uid, gid = layers.owner_at(pfd if up is None else up, name)
        finally:
            if up is not None:
                os.close(up)
        if (uid, gid) == (0, 0) and self.user.uid[1] != 0:  # made by this RUN: USER's
            where = os.fsencode(os.readlink(f"/proc/self/fd/{pfd}")) + b"/" + name
            if not layers.in_lowers(self.lowers, os.fsdecode(where)):
                return self.user.uid[0], self.user.gid[0]
        return uid, gid

    def _chown(self, nid: int, pid: int, call: str, args: list[int], legacy: bool) -> int:
        if call == "fchownat":
            dirfd, uid, gid, flags = _sint(args[0]), args[2], args[3], args[4]
            path = self._read(pid, args[1], _PATH_MAX, True)
            follow = not flags & _AT_SYMLINK_NOFOLLOW
            if not path and flags & _AT_EMPTY_PATH:
                path_arg: bytes | None = None
            else:
                path_arg = path
        elif call == "fchown":
            dirfd, path_arg, uid, gid, follow = _sint(args[0]), None, args[1], args[2], True
        else:
            dirfd, uid, gid, follow = _AT_FDCWD, args[1], args[2], call == "chown"
            path_arg = self._read(pid, args[0], _PATH_MAX, True)
        uid, gid = _id(uid, legacy), _id(gid, legacy)
        creds = self._creds_of(pid)
        self._valid(nid)
        entry = self._entry(pid, dirfd, path_arg, follow)
        if entry is None:
            return 0
        if not self._records:
            self._records = True
            self._tell(b"R")
        pfd, name = entry
        try:
            cur_uid, cur_gid = self._owner(pfd, name)
            new = (cur_uid if uid == NO_ID else uid, cur_gid if gid == NO_ID else gid)
            if creds.uid[1] != 0 and (
                creds.uid[3] != cur_uid or new[0] != cur_uid or new[1] not in (cur_gid, creds.gid[3], *creds.groups)
            ):
                raise _Answer(errno.EPERM)
            up = self._record_dir(pfd, name)
            try:
                layers.set_owner_at(pfd if up is None else up, name, *new, ownership=Ownership.RECORDED)
            finally:
                if up is not None:
                    os.close(up)
        finally:
            os.close(pfd)
        return 0

    def _mknod(self, nid: int, pid: int, call: str, args: list[int]) -> int:
        dirfd, path_addr, mode, dev = (_AT_FDCWD, *args[:3]) if call == "mknod" else (_sint(args[0]), *args[1:4])
        path = self._read(pid, path_addr, _PATH_MAX, True)
        creds = self._creds_of(pid)
        umask = _umask(pid)
        self._valid(nid)
        if creds.uid[1] != 0:
            raise _Answer(errno.EPERM)
        parent, name = posixpath.split(path.rstrip(b"/") if path.strip(b"/") else path)
        if not name or name in (b".", b"..") or path.endswith(b"/"):
            raise _Answer(errno.EEXIST)
        if not parent:
            parent = self._fd_path(pid, dirfd)
        elif not parent.startswith(b"/"):
            parent = self._fd_path(pid, dirfd) + b"/" + parent
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            pfd = open_in_root(root, parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if os.fstat(pfd).st_dev != os.fstat(root).st_dev:
                    raise _Answer(errno.EPERM)  # a device on /dev's tmpfs or a mount: as a namespace says
                major, minor = (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
                kind = b"c" if mode & 0o170000 == 0o020000 else b"b"
                if not self._records:
                    self._records = True
                    self._tell(b"R")
                layers.make_device_at(pfd, name, kind, major, minor, mode & 0o7777 & ~umask)
                if (creds.uid[3], creds.gid[3]) != (0, 0):
                    layers.set_owner_at(pfd, name, creds.uid[3], creds.gid[3], ownership=Ownership.RECORDED)
            finally:
                os.close(pfd)
        finally:
            os.close(root)
        return 0

    def _setxattr(self, nid: int, pid: int, call: str, args: list[int]) -> int:
        name = self._read(pid, args[1], 256, True)
        size = args[3] & 0xFFFFFFFFFFFFFFFF
        if size > _XATTR_SIZE_MAX:
            raise _Answer(errno.E2BIG)
        value = self._read(pid, args[2], size, False) if size else b""
        flags = args[4] & 0xFFFFFFFF
        if call == "fsetxattr":
            dirfd, path = _sint(args[0]), None
        else:
            dirfd, path = _AT_FDCWD, self._read(pid, args[0], _PATH_MAX, True)
        creds = self._creds_of(pid)
        self._valid(nid)
        if name.startswith(b"user.overlay."):
            raise _Answer(errno.EPERM)  # as overlayfs answers it
        if name.startswith(b"user.rbuild."):  # rbuild's own records: only the supervisor writes them. Not
            return 0  # written, as a subuid build's commit drops them: the same image either way
        acl = name.startswith(b"system.posix_acl_")
        if creds.uid[1] != 0 and not name.startswith(b"user.") and not acl:
            raise _Answer(errno.EPERM)  # trusted.*, security.*: capabilities a non-root process has not
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if path is None:
                tfd = os.open(f"/proc/{pid}/fd/{dirfd}", os.O_PATH | os.O_CLOEXEC)
            else:
                full = path if path.startswith(b"/") else self._fd_path(pid, _AT_FDCWD) + b"/" + path
                tfd = open_in_root(root, full, os.O_PATH | (0 if call == "setxattr" else os.O_NOFOLLOW))
            try:
                if stat.S_ISLNK(os.fstat(tfd).st_mode):
                    raise _Answer(errno.EPERM)  # no user.* on a symlink (and nothing else here)
                if acl and creds.uid[1] != 0 and not self._owns(pid, tfd, creds.uid[3]):
                    raise _Answer(errno.EPERM)  # an ACL is its owner's to set (cp -a sets the copy's)
                os.setxattr(f"/proc/self/fd/{tfd}", name, value, flags)
            finally:
                os.close(tfd)
        finally:
            os.close(root)
        return 0

    def _stat(self, nid: int, pid: int, arch: int, call: str, args: list[int]) -> int:
        """stat of an entry with an owner or device record: the kernel's answer with the record applied.

        Everything else (no record, outside the tree, an error, a 32-bit ABI's struct) the kernel answers
        itself (CONTINUE: safe here, as a stat grants nothing). Only x86_64's struct stat is rewritten;
        statx's layout is the same on every ABI.
        """
        if call != "statx" and arch != _AUDIT_ARCH_X86_64 or _native() != _AUDIT_ARCH_X86_64:
            return CONTINUE
        if not self._records and self.user.uid[1] == 0:  # nothing to show but what the kernel shows
            return CONTINUE
        mask = 0
        if call == "fstat":
            dirfd, path_addr, flags, buf = _sint(args[0]), 0, _AT_EMPTY_PATH, args[1]
        elif call in ("stat", "lstat"):
            dirfd, path_addr, buf = _AT_FDCWD, args[0], args[1]
            flags = _AT_SYMLINK_NOFOLLOW if call == "lstat" else 0
        elif call == "newfstatat":
            dirfd, path_addr, buf, flags = _sint(args[0]), args[1], args[2], args[3] & 0xFFFFFFFF
        else:
            dirfd, path_addr, flags, mask, buf = _sint(args[0]), args[1], args[2] & 0xFFFFFFFF, args[3], args[4]
        try:
            path = self._read(pid, path_addr, _PATH_MAX, True) if path_addr else b""
            if not path and (flags & _AT_EMPTY_PATH or call == "fstat"):
                where = f"/proc/{pid}/cwd" if dirfd == _AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
                tfd = os.open(where, os.O_PATH | os.O_CLOEXEC)
            else:
                root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    full = path if path.startswith(b"/") else self._fd_path(pid, dirfd) + b"/" + path
                    nofollow = os.O_NOFOLLOW if flags & _AT_SYMLINK_NOFOLLOW else 0
                    tfd = open_in_root(root, full, os.O_PATH | nofollow)
                finally:
                    os.close(root)
        except (OSError, _Answer):
            return CONTINUE
        try:
            link = f"/proc/self/fd/{tfd}"
            try:
                names = [n for n in os.listxattr(link) if n in (layers.XATTR_STAT, layers.XATTR_DEV)]
                recs = {n: os.getxattr(link, n) for n in names}
            except OSError:
                return CONTINUE
            uid_gid = layers.parse_ids(recs[layers.XATTR_STAT]) if layers.XATTR_STAT in recs else None
            dev = layers.parse_dev(recs[layers.XATTR_DEV]) if layers.XATTR_DEV in recs else None
            if uid_gid is None and dev is None:
                try:
                    uid_gid = self._child_record(pid, tfd)
                except OSError:
                    return CONTINUE
            if uid_gid is None and self.user.uid[1] != 0 and self._made_here(pid, tfd):
                uid_gid = (self.user.uid[0], self.user.gid[0])
            if uid_gid is None and dev is None:
                return CONTINUE
            return self._stat_with(nid, pid, tfd, call, flags, mask, buf, uid_gid, dev)
        finally:
            os.close(tfd)

    def _child_record(self, pid: int, tfd: int) -> tuple[int, int] | None:
        """The owner recorded for a symlink, fifo or socket open as tfd (in its parent's lstat record).

        The upper dir's copy is asked first: the record there names the upper inode (see _record_dir).
        """
        st = os.fstat(tfd)
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            return None
        where = os.fsencode(os.readlink(f"/proc/self/fd/{tfd}"))
        parent, name = posixpath.split(where)
        if not where.startswith(b"/") or where.endswith(b" (deleted)") or not name:
            return None
        try:
            pfd = open_beneath(self.upper, os.fsdecode(parent)) if self.upper else -1
            try:
                if pfd >= 0:
                    os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except OSError:
                os.close(pfd)
                pfd = -1
        except OSError:
            pfd = -1
        if pfd < 0:
            root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                pfd = open_in_root(root, parent, os.O_RDONLY | os.O_DIRECTORY)
            finally:
                os.close(root)
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            owner = layers.owner_at(pfd, name)
        finally:
            os.close(pfd)
        return None if owner == layers.disk_owner(st) else owner

    def _owns(self, pid: int, tfd: int, uid: int) -> bool:
        """`uid` owns the entry open as tfd, or may: made by this RUN without a record, it was made by USER
        or by a process that switched ids (apt's _apt), which the supervisor does not follow."""
        try:
            rec = os.getxattr(f"/proc/self/fd/{tfd}", layers.XATTR_STAT)
        except OSError:
            rec = None
        if rec is not None:
            return layers.parse_ids(rec)[0] == uid
        return os.fstat(tfd).st_uid == uid or self._made_here(pid, tfd)

    def _made_here(self, pid: int, tfd: int) -> bool:
        """The entry open as tfd was made by this RUN (in the tree, 0:0, not in the lowers): USER's."""
        st = os.fstat(tfd)
        if (st.st_uid, st.st_gid) != (0, 0) or stat.S_ISLNK(st.st_mode):
            return False
        if st.st_dev != os.stat(f"/proc/{pid}/root").st_dev:
            return False
        where = os.readlink(f"/proc/self/fd/{tfd}")
        return where.startswith("/") and not where.endswith(" (deleted)") and not layers.in_lowers(self.lowers, where)

    def _stat_with(
        self,
        nid: int,
        pid: int,
        tfd: int,
        call: str,
        flags: int,
        mask: int,
        buf: int,
        uid_gid: tuple[int, int] | None,
        dev: tuple[bytes, int, int] | None,
    ) -> int:
        libc = _libc()
        if call == "statx":
            out = ctypes.create_string_buffer(256)
            sync = flags & 0x6000  # AT_STATX_SYNC_TYPE
            rc = libc.syscall(_SYS["statx"], tfd, b"", _AT_EMPTY_PATH | sync, mask & 0xFFFFFFFF, out)
        else:
            out = ctypes.create_string_buffer(144)
            rc = libc.syscall(_SYS["newfstatat"], tfd, b"", out, _AT_EMPTY_PATH)
        if rc != 0:
            return CONTINUE
        data = bytearray(out.raw)
        if call == "statx":  # stx_uid @20, stx_gid @24, stx_mode (u16) @28, stx_size @40, stx_rdev @128
            if uid_gid is not None:
                struct.pack_into("=II", data, 20, *uid_gid)
            if dev is not None:
                kind, major, minor = dev
                mode = struct.unpack_from("=H", data, 28)[0] & 0o7777
                struct.pack_into("=H", data, 28, mode | (0o020000 if kind == b"c" else 0o060000))
                struct.pack_into("=Q", data, 40, 0)
                struct.pack_into("=II", data, 128, major, minor)
        else:  # x86_64 struct stat: st_mode @24, st_uid @28, st_gid @32, st_rdev @40, st_size @48
            if uid_gid is not None:
                struct.pack_into("=II", data, 28, *uid_gid)
            if dev is not None:
                kind, major, minor = dev
                mode = struct.unpack_from("=I", data, 24)[0] & 0o7777
                struct.pack_into("=I", data, 24, mode | (0o020000 if kind == b"c" else 0o060000))
                struct.pack_into("=qQ", data, 40, os.makedev(major, minor), 0)
        self._valid(nid)
        self._write(pid, buf, bytes(data))
        return 0

    # -- ids ----------------------------------------------------------------------------------------------
    def _creds_of(self, pid: int) -> Creds:
        """The emulated ids of pid's thread group: its own, else its nearest ancestor's, else USER's."""
        if not self._creds:
            return self.user
        for _ in range(64):
            key = _process(pid)
            if key is None:
                break
            found = self._creds.get(key[:2])
            if found is not None:
                return found
            pid = key[2]
        return self.user

    def _ids(self, nid: int, pid: int, call: str, args: list[int], legacy: bool) -> int:
        if call.startswith("get") and not self._creds and (self.user.uid[1], self.user.gid[1]) == (0, 0):
            return CONTINUE  # a root RUN where no process switched ids: the kernel's answer is the one
        c = self._creds_of(pid)
        if call == "getuid":
            return c.uid[0]
        if call == "geteuid":
            return c.uid[1]
        if call == "getgid":
            return c.gid[0]
        if call == "getegid":
            return c.gid[1]
        if legacy and call in ("getresuid", "getresgid", "getgroups", "setgroups"):
            raise _Answer(errno.ENOSYS)
        if call in ("getresuid", "getresgid"):
            ids = c.uid if call == "getresuid" else c.gid
            self._valid(nid)
            for addr, value in zip(args[:3], ids[:3], strict=True):
                self._write(pid, addr, struct.pack("=I", value))
            return 0
        if call == "getgroups":
            size = _sint(args[0])
            if size == 0:
                return len(c.groups)
            if size < len(c.groups) or size < 0:
                raise _Answer(errno.EINVAL)
            self._valid(nid)
            self._write(pid, args[1], struct.pack(f"={len(c.groups)}I", *c.groups))
            return len(c.groups)
        key = _process(pid)
        if key is None:
            raise _Answer(errno.ESRCH)
        new = c.copy()
        a = [_id(x, legacy) for x in args[:3]]
        if call == "setgroups":
            n = _sint(args[0])
            if n < 0 or n > 65536:
                raise _Answer(errno.EINVAL)
            groups = struct.unpack(f"={n}I", self._read(pid, args[1], 4 * n, False)) if n else ()
            if c.uid[1] != 0:
                raise _Answer(errno.EPERM)
            new.groups = sorted(set(groups))
        elif call in ("setfsuid", "setfsgid"):
            ids = new.uid if call == "setfsuid" else new.gid
            old = ids[3]
            if c.uid[1] == 0 or a[0] in ids:
                ids[3] = a[0]
            self._set(key, pid, new)
            return old
        else:
            ids = new.uid if call.endswith("uid") else new.gid
            _change(ids, call.removesuffix("uid").removesuffix("gid"), a, privileged=c.uid[1] == 0)
        self._valid(nid)
        self._set(key, pid, new)
        return 0

    def _set(self, key: tuple[int, int, int], pid: int, new: Creds) -> None:
        if new.uid[1] != 0 and not any(c.uid[1] != 0 for c in self._creds.values()) and self.user.uid[1] == 0:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = str(pid)
            self.warnings.append(
                f"{comm} switched to uid {new.uid[1]}: a single-uid build does not follow it: it keeps root's "
                "file permissions, and what it creates is recorded as owned by the RUN's user"
            )
        if not self._creds:
            self._tell(b"I")  # get*id are answered here from now
        self._creds[key[:2]] = new


_HOLDS: dict[tuple[str, int, int], bool] = {}


def _holds_records(top: str) -> bool:
    """Some entry of layer dir `top` has an owner or device record (stops at the first one it finds).

    A layer dir does not change once committed: the answer is kept per (path, inode, mtime).
    """
    try:
        st = os.stat(top)
    except OSError:
        return True
    key = (top, st.st_ino, st.st_mtime_ns)
    if key not in _HOLDS:
        _HOLDS[key] = layers.holds_records(top)
    return _HOLDS[key]


def _change(ids: list[int], kind: str, a: list[int], *, privileged: bool) -> None:
    """setuid/setreuid/setresuid (and the gid ones) on ids [real, effective, saved, fs], as the kernel does."""
    allowed = set(ids[:3])
    if kind == "set":  # setuid(x)
        x = a[0]
        if privileged:
            ids[:] = [x] * 4
        elif x in (ids[0], ids[2]):
            ids[1] = ids[3] = x
        else:
            raise _Answer(errno.EPERM)
    elif kind == "setre":
        r, e = a[0], a[1]
        if not privileged and ((r != NO_ID and r not in (ids[0], ids[1])) or (e != NO_ID and e not in allowed)):
            raise _Answer(errno.EPERM)
        old_r = ids[0]
        if r != NO_ID:
            ids[0] = r
        if e != NO_ID:
            ids[1] = e
        if r != NO_ID or (e != NO_ID and e != old_r):
            ids[2] = ids[1]
        ids[3] = ids[1]
    elif kind == "setres":
        if not privileged and any(x != NO_ID and x not in allowed for x in a):
            raise _Answer(errno.EPERM)
        for i, x in enumerate(a):
            if x != NO_ID:
                ids[i] = x
        ids[3] = ids[1]
    else:
        raise _Answer(errno.ENOSYS)


def _process(pid: int) -> tuple[int, int, int] | None:
    """(thread group id, start time, parent pid) of task `pid`, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = dict(ln.split(b":", 1) for ln in f if b":" in ln)
        tgid, ppid = int(status[b"Tgid"]), int(status[b"PPid"])
        with open(f"/proc/{tgid}/stat", "rb") as f:
            start = int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return tgid, start, ppid


def _umask(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for ln in f:
                if ln.startswith(b"Umask:"):
                    return int(ln.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _sint(v: int) -> int:
    """A 32-bit int argument (a dirfd, a count) as the signed value the caller passed."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _id(v: int, legacy: bool) -> int:
    """A uid_t/gid_t argument; i386's 16-bit calls mean "no change" by 0xffff."""
    if legacy:
        v &= 0xFFFF
        return NO_ID if v == 0xFFFF else v
    return v & 0xFFFFFFFF


@functools.cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib


@functools.cache
def _native() -> int:
    from rootless.sandbox import seccomp

    return seccomp.native_arch()
