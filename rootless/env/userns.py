"""Entering the build's user namespace from a freshly forked, single-threaded child.

The caller becomes uid/gid 0 inside; its /etc/subuid and /etc/subgid ranges (mapped by the setuid
newuidmap/newgidmap helpers) become 1..N. Without a range, a single-uid map is used and said so.
Run as real root, no user namespace is needed: the child only gets a private mount namespace.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable

from rootless.errors import RbuildError
from rootless.idmap import IdMap, Range
from rootless.kernel import linux


def _sub_ranges(path: str, names: set[str]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in names and parts[1].isdigit() and parts[2].isdigit():
                    out.append((int(parts[1]), int(parts[2])))
    except OSError:
        pass
    return out


def host_mapping() -> tuple[IdMap, str | None]:
    """The mapping this user gets, plus a one-line notice when it is the degraded single-uid map."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        full = ((0, 0, 4294967295),)
        return IdMap(full, full, real_root=True), None
    names = {str(uid)}
    try:
        names.add(pwd.getpwuid(uid).pw_name)
    except KeyError:
        pass
    subuids = _sub_ranges("/etc/subuid", names)
    subgids = _sub_ranges("/etc/subgid", names)
    helpers = shutil.which("newuidmap") and shutil.which("newgidmap")
    if subuids and subgids and helpers:
        uids: list[Range] = [(0, uid, 1)]
        gids: list[Range] = [(0, gid, 1)]
        inside = 1
        for start, count in subuids:
            uids.append((inside, start, count))
            inside += count
        inside = 1
        for start, count in subgids:
            gids.append((inside, start, count))
            inside += count
        return IdMap(tuple(uids), tuple(gids)), None
    why = "newuidmap/newgidmap not found" if not helpers else f"no range for uid {uid} in /etc/subuid and /etc/subgid"
    notice = f"rbuild: {why}: using a single-uid user namespace (only uid 0 exists in builds)"
    return IdMap(((0, uid, 1),), ((0, gid, 1),)), notice


def _write_maps(pid: int, idmap: IdMap) -> None:
    if idmap.single:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"0 {idmap.uids[0][1]} 1\n")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"0 {idmap.gids[0][1]} 1\n")
        return
    for tool, ranges in (("newuidmap", idmap.uids), ("newgidmap", idmap.gids)):
        argv = [tool, str(pid)] + [str(x) for r in ranges for x in r]
        res = subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise RbuildError(f"{tool} failed: {res.stderr.strip() or res.returncode}")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_inside(idmap: IdMap, fn: Callable[[], int], error: Callable[[str], None]) -> int:
    """Run fn() in a forked child inside the user (and a private mount) namespace; return its exit status.

    error receives the message of a failure fn did not handle itself (entering the namespace failed).

    Mounts made by fn vanish with the child's mount namespace, so even a killed build leaves none behind.
    SIGTERM and SIGHUP (a closed terminal) end fn the way Ctrl-C does, cleaning up; so does the death of
    this process, however it dies (the child's death signal).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        code = 125
        try:
            os.close(ready_r)
            os.close(go_w)
            signal.signal(signal.SIGTERM, _terminate)
            signal.signal(signal.SIGHUP, _terminate)
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # it died before the death signal was armed
                raise KeyboardInterrupt
            flags = linux.CLONE_NEWNS if idmap.real_root else linux.CLONE_NEWUSER | linux.CLONE_NEWNS
            try:
                linux.unshare(flags)
            except OSError as e:
                os.write(ready_w, b"E")
                raise RbuildError(
                    f"cannot create a user namespace: {e.strerror} (are unprivileged user "
                    "namespaces enabled? sysctl user.max_user_namespaces)"
                ) from None
            os.write(ready_w, b"R")
            os.close(ready_w)
            if os.read(go_r, 1) != b"G":
                os._exit(125)
            os.close(go_r)
            if not idmap.real_root:
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
                if not idmap.single:
                    os.setgroups([])
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            code = fn()
        except RbuildError as e:
            error(str(e))
            code = e.exit_code
        except KeyboardInterrupt:
            code = 130
        except BaseException as e:  # never let the child fall back into the parent's code
            if isinstance(e, SystemExit):
                code = e.code if isinstance(e.code, int) else 125
            else:
                error(f"{type(e).__name__}: {e}")
                code = 125
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child gets the terminal's SIGINT itself

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    old_term = signal.signal(signal.SIGTERM, forward)
    old_hup = signal.signal(signal.SIGHUP, forward)
    try:
        state = os.read(ready_r, 1)
        os.close(ready_r)
        if state == b"R":
            try:
                if not idmap.real_root:
                    _write_maps(pid, idmap)
                os.write(go_w, b"G")
            except (RbuildError, OSError) as e:
                os.close(go_w)
                os.waitpid(pid, 0)
                if isinstance(e, RbuildError):
                    raise
                raise RbuildError(f"cannot set up the user namespace mapping: {e}") from None
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)
