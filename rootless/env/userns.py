"""Entering the build's user namespace from a freshly forked, single-threaded child.

The caller becomes uid/gid 0 inside; its /etc/subuid and /etc/subgid ranges (mapped by the setuid
newuidmap/newgidmap helpers) become 1..N. Without a range, or when the helpers fail here (no_new_privs,
not setuid, a range outside the container's own map), a single-uid map is used and said so.
uid 0 is not proof of real root: real root has CAP_SYS_ADMIN in the initial user namespace
(`/proc/self/uid_map` is the identity `0 0 4294967295`), and needs no user namespace, only a private
mount namespace. Root of a container or of another user namespace maps the ids of its own namespace
itself (CAP_SETUID). Where user namespaces are blocked (a sysctl, seccomp, AppArmor), the build runs in
the current namespace without mounts: with real chown where the caller holds CAP_CHOWN and friends
(rung 4, `none-privileged`), else with owners recorded (rung 5, `none`: no RUN).
"""

from __future__ import annotations

import errno
import functools
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


def sub_ranges(path: str, names: set[str]) -> list[tuple[int, int]]:
    """(start, count) of the lines of /etc/subuid or /etc/subgid that name one of `names`."""
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


IDENTITY: tuple[Range, ...] = ((0, 0, 4294967295),)  # the initial user namespace's map
CAP_CHOWN, CAP_FOWNER, CAP_SETGID, CAP_SETUID, CAP_SYS_CHROOT, CAP_SYS_ADMIN, CAP_MKNOD = 0, 3, 6, 7, 18, 21, 27
# what rung 4 needs in the current namespace: real chown, any file's metadata, device nodes, chroot
PRIVILEGED_CAPS = (CAP_CHOWN, CAP_FOWNER, CAP_MKNOD, CAP_SYS_CHROOT, CAP_SETUID, CAP_SETGID)


def effective_caps() -> int:
    """This process's effective capability set (CapEff of /proc/self/status) as a bit mask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def has_caps(*caps: int) -> bool:
    mask = effective_caps()
    return all(mask >> cap & 1 for cap in caps)


def own_map(kind: str) -> tuple[Range, ...]:
    """This process's own user namespace map (`uid_map` or `gid_map`): (inside, outside, count) lines."""
    try:
        with open(f"/proc/self/{kind}") as f:
            return tuple((int(a), int(b), int(c)) for a, b, c in (ln.split() for ln in f if ln.strip()))
    except (OSError, ValueError):
        return ()


def initial_namespace() -> bool:
    """Whether this process is in the initial user namespace (whose map is the full identity)."""
    return own_map("uid_map") == IDENTITY


def real_root() -> bool:
    """Root of the host: CAP_SYS_ADMIN in the initial user namespace -- never just uid 0."""
    return os.getuid() == 0 and initial_namespace() and has_caps(CAP_SYS_ADMIN)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _seccomp_mode() -> str | None:
    text = _read_text("/proc/self/status") or ""
    return next((ln.split()[1] for ln in text.splitlines() if ln.startswith("Seccomp:")), None)


USERNS_SECCOMP_REMEDY = (
    "allow CLONE_NEWUSER in the seccomp profile: docker/podman run --security-opt seccomp=unconfined "
    "(or a profile allowing unshare/clone with CLONE_NEWUSER); Kubernetes: securityContext.seccompProfile.type: "
    "Unconfined"
)
APPARMOR_REMEDY = (
    "let rbuild create user namespaces: write /etc/apparmor.d/rbuild with "
    "'abi <abi/4.0>, include <tunables/global> profile rbuild {RBUILD} flags=(unconfined) { userns, }' "
    "and run apparmor_parser -r /etc/apparmor.d/rbuild (or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0)"
)


def userns_gate(err: int) -> tuple[str, str]:
    """Which gate refused a user namespace (unshare's errno `err`) and its remedy: one answer for `doctor`
    and for a build's error."""
    limit = _read_text("/proc/sys/user/max_user_namespaces")
    if err == errno.ENOSPC or limit == "0":
        return f"sysctl user.max_user_namespaces is {limit}", "sysctl -w user.max_user_namespaces=15000"
    if _read_text("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "sysctl kernel.unprivileged_userns_clone is 0", "sysctl -w kernel.unprivileged_userns_clone=1"
    apparmor = _read_text("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1"
    if apparmor and err in (errno.EACCES, errno.EPERM):
        rbuild = shutil.which("rbuild") or "/usr/local/bin/rbuild"
        return "AppArmor restricts unprivileged user namespaces", APPARMOR_REMEDY.replace("{RBUILD}", rbuild)
    if _seccomp_mode() == "2" and err == errno.EPERM:
        return f"a seccomp filter blocks CLONE_NEWUSER ({os.strerror(err)})", USERNS_SECCOMP_REMEDY
    if os.getuid() != 0 and err == errno.EPERM and not has_caps(CAP_SYS_ADMIN):
        return (
            f"unshare(CLONE_NEWUSER): {os.strerror(err)} (a chroot or an LSM policy forbids it here)",
            "run rbuild outside the chroot, or build without RUN (--isolation none)",
        )
    return f"unshare(CLONE_NEWUSER): {os.strerror(err)}", "check the kernel's user namespace settings (rbuild doctor)"


def userns_refusal(err: int) -> str:
    """`userns_gate` as one clause for an error line."""
    gate, remedy = userns_gate(err)
    return f"{gate} (remedy: {remedy})"


@functools.cache
def userns_blocked() -> str | None:
    """None when this process may create a user namespace, else the gate and its remedy.

    Tried for real, in a forked child (the caller is single-threaded: the command line, before any work).
    """
    pid = os.fork()
    if pid == 0:
        try:
            linux.unshare(linux.CLONE_NEWUSER)
            os._exit(0)
        except OSError as e:
            os._exit(e.errno or 1)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    err = os.waitstatus_to_exitcode(status)
    return None if err == 0 else userns_refusal(err)


# `--isolation` / RBUILD_ISOLATION: the user's name -> the rung (None: the best that works here)
ISOLATIONS: dict[str, str | None] = {
    "auto": None,
    "host": "host-root",
    "userns": "userns",
    "single": "userns-single",
    "privileged": "none-privileged",
    "none": "none",
}
ISOLATION_ALIASES = {"chroot": "privileged"}  # buildah's name for running RUN without a user namespace
_forced: list[str] = []  # the rung the user forced for this process (set once by the command line)


def force(name: str) -> None:
    """Force the isolation rung `name` (a user's `--isolation`) for this process: a rung that cannot work
    here is then an error saying why (`host_mapping`), never a fallback to another."""
    key = ISOLATION_ALIASES.get(name, name)
    if key not in ISOLATIONS:
        names = ", ".join([*ISOLATIONS, *ISOLATION_ALIASES])
        raise RbuildError(f"unknown isolation {name!r}: choose one of {names}")
    _forced[:] = [r for r in (ISOLATIONS[key],) if r is not None]


def forced() -> str | None:
    """The rung the user forced, or None (the automatic choice)."""
    return _forced[0] if _forced else None


def isolation(idmap: IdMap) -> str:
    """How a build under `idmap` is isolated: `host-root`, `userns`, `userns-single`, or, where no user
    namespace can be made, `none-privileged` (real chown, no mounts) or `none` (owners recorded, no RUN)."""
    if _forced:
        return _forced[0]
    if idmap.real_root:
        return "host-root" if has_caps(CAP_SYS_ADMIN) else "none-privileged"
    if userns_blocked() is not None:
        return "none"
    return "userns-single" if idmap.single else "userns"


def host_mapping() -> tuple[IdMap, str | None]:
    """The mapping this user gets, plus a one-line notice when it is the degraded single-uid map."""
    uid = os.getuid()
    if _forced:
        return _forced_mapping(_forced[0]), None
    if real_root():
        return IdMap(IDENTITY, IDENTITY, real_root=True), None
    if uid == 0 and has_caps(CAP_SETUID, CAP_SETGID):
        # root of a container or of a user namespace: a new namespace gets every id of this one, mapped
        # to itself (_write_maps); recorded as this namespace's own map, so rbuild inside `rbuild unshare`
        # describes the store's files exactly as the rbuild outside does, and shares its store
        own = own_map("uid_map"), own_map("gid_map")
        if userns_blocked() is None:
            return IdMap(*own), None
        if has_caps(*PRIVILEGED_CAPS):  # rung 4: the current namespace, real chown, no mounts
            return IdMap(*own, real_root=True), None
    blocked = userns_blocked()
    if blocked is not None:  # rung 5: this namespace, this uid, owners recorded
        return single_map(), f"rbuild: no user namespace here: {blocked}; builds without RUN still work"
    ranged, why = _range_map()
    if ranged is not None:
        return ranged, None
    return single_map(), f"rbuild: {why}: {_SINGLE}"


def _range_map() -> tuple[IdMap | None, str]:
    """The map of this user's /etc/subuid and /etc/subgid ranges, or None and why there is none."""
    uid, gid = os.getuid(), os.getgid()
    names = {str(uid)}
    try:
        names.add(pwd.getpwuid(uid).pw_name)
    except KeyError:
        pass
    subuids = sub_ranges("/etc/subuid", names)
    subgids = sub_ranges("/etc/subgid", names)
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
        return IdMap(tuple(uids), tuple(gids)), ""
    why = "newuidmap/newgidmap not found" if not helpers else f"no range for uid {uid} in /etc/subuid and /etc/subgid"
    return None, why


def _forced_mapping(rung: str) -> IdMap:
    """The mapping of the rung the user forced; an error saying why when it cannot work here."""
    flag = f"--isolation {next(k for k, v in ISOLATIONS.items() if v == rung)}"
    if rung == "host-root":
        if not real_root():
            raise RbuildError(
                f"{flag}: this is not real root (uid {os.getuid()}, CAP_SYS_ADMIN in the initial user namespace "
                "is needed); use --isolation auto"
            )
        return IdMap(IDENTITY, IDENTITY, real_root=True)
    if rung == "none-privileged":
        if os.getuid() != 0 or not has_caps(*PRIVILEGED_CAPS):
            raise RbuildError(
                f"{flag}: building without a user namespace with real chown needs uid 0 with CAP_CHOWN, "
                "CAP_FOWNER, CAP_MKNOD, CAP_SYS_CHROOT, CAP_SETUID and CAP_SETGID (root of a container); "
                f"this is uid {os.getuid()}: use --isolation auto"
            )
        return IdMap(own_map("uid_map"), own_map("gid_map"), real_root=True)
    if rung == "none":
        return single_map()
    if real_root():
        raise RbuildError(f"{flag}: real root builds without a user namespace: use --isolation host or auto")
    blocked = userns_blocked()
    if blocked is not None:
        raise RbuildError(f"{flag}: no user namespace can be created here: {blocked}")
    if rung == "userns-single":
        return single_map()
    if os.getuid() == 0 and has_caps(CAP_SETUID, CAP_SETGID):  # root of a container: its own ids
        return IdMap(own_map("uid_map"), own_map("gid_map"))
    ranged, why = _range_map()
    if ranged is None:
        raise RbuildError(
            f"{flag}: {why} (remedy: add a range, e.g. usermod --add-subuids 100000-165535 "
            "--add-subgids 100000-165535 USER, or use --isolation single)"
        )
    return ranged


_SINGLE = "using a single-uid user namespace (only uid 0 exists in builds)"


def single_map() -> IdMap:
    """The map an unprivileged user can always write: its own uid and gid as 0."""
    return IdMap(((0, os.getuid(), 1),), ((0, os.getgid(), 1),))


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _write_maps(pid: int, idmap: IdMap, warn: Callable[[str], None]) -> IdMap:
    """Map the child's namespace; returns the mapping it got (the single-uid map when the helpers fail,
    said to warn)."""
    if idmap.single:  # the caller's own ids, as this namespace numbers them
        _write_file(f"/proc/{pid}/setgroups", "deny")
        _write_file(f"/proc/{pid}/uid_map", f"0 {os.getuid()} 1\n")
        _write_file(f"/proc/{pid}/gid_map", f"0 {os.getgid()} 1\n")
        return idmap
    if os.getuid() == 0 and has_caps(CAP_SETUID, CAP_SETGID):  # root of this namespace: its ids, as they are
        _write_file(f"/proc/{pid}/gid_map", "".join(f"{a} {a} {c}\n" for a, _, c in idmap.gids))
        _write_file(f"/proc/{pid}/uid_map", "".join(f"{a} {a} {c}\n" for a, _, c in idmap.uids))
        return idmap
    for n, (tool, ranges) in enumerate((("newgidmap", idmap.gids), ("newuidmap", idmap.uids))):
        argv = [tool, str(pid)] + [str(x) for r in ranges for x in r]
        res = subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if res.returncode == 0:
            continue
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        if n == 0 and _forced:
            raise RbuildError(
                f"--isolation userns: {tool} failed ({why}); the subuid map cannot be written here "
                "(no_new_privs, helpers not setuid, or a range outside this namespace): use --isolation single"
            )
        if n == 0:  # nothing is mapped yet: the map any user may write still can be
            fallback = single_map()
            warn(f"rbuild: {tool} failed ({why}): {_SINGLE}")
            return _write_maps(pid, fallback, warn)
        raise RbuildError(
            f"{tool} failed ({why}) after newgidmap succeeded; check that /etc/subuid and /etc/subgid "
            "name ranges this namespace holds"
        )
    return idmap


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _unshare_flags(idmap: IdMap) -> int:
    rung = isolation(idmap)
    if rung == "host-root":  # a private mount namespace
        return linux.CLONE_NEWNS
    if rung in ("none-privileged", "none"):  # the current namespaces: no mounts
        return 0
    return linux.CLONE_NEWUSER | linux.CLONE_NEWNS


def run_inside(
    idmap: IdMap, fn: Callable[[IdMap], int], error: Callable[[str], None], warn: Callable[[str], None]
) -> int:
    """Run fn(mapping) in a forked child inside the user (and a private mount) namespace; its exit status.

    The mapping fn gets is `idmap`, or the single-uid map when the id-mapping helpers failed (then warn
    receives the one line saying why). Where no namespace can be made (`isolation` none or
    none-privileged), fn runs in a plain child. error receives the message of a failure fn did not
    handle itself (entering the namespace failed); nothing here prints.
    Mounts made by fn vanish with the child's mount namespace, so even a killed build leaves none behind.
    SIGTERM and SIGHUP (a closed terminal) end fn the way Ctrl-C does, cleaning up; so does the death of
    this process, however it dies (the child's death signal).
    """
    flags = _unshare_flags(idmap)
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
            try:
                if flags:
                    linux.unshare(flags)
            except OSError as e:
                os.write(ready_w, b"E")
                what = "a user namespace" if flags & linux.CLONE_NEWUSER else "a mount namespace"
                gate = userns_refusal(e.errno or 0) if flags & linux.CLONE_NEWUSER else f"unshare: {e.strerror}"
                raise RbuildError(f"cannot create {what}: {gate}") from None
            os.write(ready_w, b"R")
            os.close(ready_w)
            answer = os.read(go_r, 1)
            if answer not in (b"G", b"S"):
                os._exit(125)
            os.close(go_r)
            if answer == b"S":  # the helpers failed: the parent wrote the single-uid map
                idmap = single_map()
            if flags & linux.CLONE_NEWUSER:
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
                if not idmap.single:
                    os.setgroups([])
            if flags & linux.CLONE_NEWNS:
                try:
                    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
                except OSError as e:
                    raise RbuildError(
                        f"the build's mount namespace: cannot make / private: {e.strerror}; mount(2) is "
                        "denied here although the namespace was created (a seccomp or LSM policy: allow "
                        "mount in the container's profile)"
                    ) from None
            code = fn(idmap)
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
                got = _write_maps(pid, idmap, warn) if flags & linux.CLONE_NEWUSER else idmap
                os.write(go_w, b"G" if got == idmap else b"S")
            except (RbuildError, OSError) as e:
                os.close(go_w)
                os.waitpid(pid, 0)
                if isinstance(e, RbuildError):
                    raise
                raise RbuildError(
                    f"cannot map the build's user namespace ({idmap.describe()}): {e.strerror or e}"
                ) from None
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)
