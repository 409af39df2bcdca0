"""Real recreations of the places rbuild has to build in (issue 11), for the tests: no mocks.

A test (running as root) describes an environment with an EnvSpec and runs commands in it:

    with EnvSim(EnvSpec(masked_proc=True, docker_caps=True, seccomp_no_userns=True)) as env:
        res = env.run(["cat", "/proc/self/status"])              # uid 0 "in a container"
        res = env.run([rbuild, "doctor"], user=rb, env={...})    # as an unprivileged user

Each run starts this file as a launcher under Debian's /usr/bin/python3 (which has libseccomp's binding,
python3-seccomp). The launcher, still root, builds the environment with the kernel's own features, then
drops to the user (or stays uid 0) and execs the command:
  masked_proc        new mount and pid namespaces, a fresh /proc with runc's masked paths (/dev/null or a
                     read-only tmpfs over them) and read-only paths, so a new procfs cannot be mounted in a
                     user namespace there (the kernel's "fully visible" rule), as in a container;
  docker_caps        docker's default capability set (bounding set too): root in an unprivileged container;
  seccomp_no_userns  a seccomp filter: unshare/clone with CLONE_NEWUSER -> EPERM, clone3 -> ENOSYS (docker's
                     default profile without CAP_SYS_ADMIN);
  no_new_privs       PR_SET_NO_NEW_PRIVS before the exec (setuid newuidmap gains nothing);
  userns_no_mount    seccomp EPERM for mount(2) and the new mount API (a hardened profile);
  store_on_overlay   `overlay_dir`, a directory on a real overlayfs mount (in the launcher's mount namespace,
                     so it vanishes with the command; its upper dir persists between runs);
  runtime_dir_taken  /tmp/rbuild-UID of the `taken_uid` user pre-created by another user (nobody);
  max_userns_zero    user.max_user_namespaces=0: set in an identity-mapped user namespace of the launcher's
                     (the limit is per namespace and checked up the chain), so the host's sysctl never changes.
`make_user(subids=1000)` adds a user with a small /etc/subuid range (small_range). Everything the
environment creates on the host (users, directories) is removed on close; mounts die with the namespaces.
Only the standard library is imported (seccomp lazily, in the launcher); nothing from rootless.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Protocol

PYTHON = "/usr/bin/python3"  # Debian's: has python3-seccomp; the launcher runs as root
NOBODY = 65534

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4

# docker's default capabilities (moby oci/caps/defaults.go), by number
DOCKER_CAPS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "NET_BIND_SERVICE": 10,
    "NET_RAW": 13,
    "SYS_CHROOT": 18,
    "MKNOD": 27,
    "AUDIT_WRITE": 29,
    "SETFCAP": 31,
}
DOCKER_CAP_MASK = sum(1 << n for n in DOCKER_CAPS.values())

# runc's defaults (libcontainer/specconv/example.go, docker's oci/defaults.go)
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
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
MOUNT_SYSCALLS = ("mount", "umount2", "open_tree", "fsopen", "fsmount", "fspick", "move_mount", "mount_setattr")


class User(Protocol):
    """What a test's user looks like here (conftest's Runner has these)."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class EnvSpec:
    """Which features of the environment to recreate (they compose)."""

    masked_proc: bool = False
    docker_caps: bool = False
    seccomp_no_userns: bool = False
    no_new_privs: bool = False
    userns_no_mount: bool = False
    store_on_overlay: bool = False
    runtime_dir_taken: bool = False
    max_userns_zero: bool = False
    taken_uid: int | None = None  # runtime_dir_taken: whose /tmp/rbuild-UID another user takes


@dataclass
class SimUser:
    """A user made by make_user (removed on close)."""

    name: str
    uid: int
    gid: int
    home: str


@dataclass
class EnvSim:
    """An environment: run() commands in it; close() (or leave the with block) removes what it made."""

    spec: EnvSpec
    base: str = ""
    overlay_dir: str = ""  # store_on_overlay: the merged directory (exists only inside run()'s commands)
    users: list[SimUser] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)
    _moved: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if os.getuid() != 0:
            raise RuntimeError("envsim needs root to build its environments")
        self.base = tempfile.mkdtemp(prefix="rbenvsim-", dir="/var/tmp")
        os.chmod(self.base, 0o755)
        try:
            if self.spec.store_on_overlay:
                for d in ("lower", "upper", "work", "merged"):
                    os.mkdir(os.path.join(self.base, d), 0o755)
                self.overlay_dir = os.path.join(self.base, "merged")
            if self.spec.runtime_dir_taken:
                self._take_runtime_dir()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> EnvSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_runtime_dir(self) -> None:
        uid = self.spec.taken_uid
        if uid is None:
            raise ValueError("runtime_dir_taken needs taken_uid")
        path = f"/tmp/rbuild-{uid}"
        if os.path.lexists(path):  # the user's own, from earlier tests: put back on close
            aside = tempfile.mkdtemp(prefix=f"rbuild-{uid}.envsim-aside-", dir="/tmp")
            os.rename(path, os.path.join(aside, "d"))
            self._moved.append((os.path.join(aside, "d"), path))
        os.mkdir(path, 0o755)
        os.chown(path, NOBODY, NOBODY)
        self._made.append(path)

    def own_overlay(self, user: User) -> None:
        """Give the overlay's root directory (the merged view shows the upper's) to user."""
        os.chown(os.path.join(self.base, "upper"), user.uid, user.gid)

    def make_user(self, subids: int | None = 1000) -> SimUser:
        """A fresh user with an /etc/subuid and /etc/subgid range of `subids` ids (None: no range)."""
        name = f"rbes{os.getpid() % 10000}{len(self.users)}"
        subprocess.run(
            ["useradd", "-m", "-s", "/bin/sh", "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0", name],
            check=True,
            capture_output=True,
        )
        pw = pwd.getpwnam(name)
        user = SimUser(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
        self.users.append(user)
        if subids:
            start = _free_subid_start()
            for path in ("/etc/subuid", "/etc/subgid"):
                with open(path, "a") as f:
                    f.write(f"{name}:{start}:{subids}\n")
        return user

    def run(
        self,
        argv: list[str],
        user: User | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        input: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the environment: as `user` (its groups too), or as uid 0 when user is None."""
        plan: dict[str, Any] = dataclasses.asdict(self.spec)
        plan["base"] = self.base
        plan["uid"] = None if user is None else user.uid
        plan["gid"] = None if user is None else user.gid
        plan["name"] = None if user is None else user.name
        plan["cwd"] = cwd or "/"
        default_env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
        return subprocess.run(
            [PYTHON, "-I", os.path.abspath(__file__), json.dumps(plan), *argv],
            env=env if env is not None else default_env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def close(self) -> None:
        for path in reversed(self._made):
            shutil.rmtree(path, ignore_errors=True)
        self._made.clear()
        if self.spec.runtime_dir_taken and self.spec.taken_uid is not None:
            # the private runtime directories rbuild made because the name was taken
            for path in glob.glob(f"/tmp/rbuild-{self.spec.taken_uid}-*"):
                shutil.rmtree(path, ignore_errors=True)
        for aside, path in self._moved:
            os.rename(aside, path)
            os.rmdir(os.path.dirname(aside))
        self._moved.clear()
        for u in self.users:
            for path in glob.glob(f"/tmp/rbuild-{u.uid}*"):
                shutil.rmtree(path, ignore_errors=True)
            subprocess.run(["userdel", "-r", u.name], capture_output=True, check=False)
            _drop_subid_lines(u.name)
        self.users.clear()
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = ""


def _free_subid_start() -> int:
    top = 100000
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    top = max(top, int(parts[1]) + int(parts[2]))
    return top


def _drop_subid_lines(name: str) -> None:
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError):
            with open(path) as f:
                lines = f.readlines()
            kept = [ln for ln in lines if ln.split(":")[0] != name]
            if kept != lines:
                with open(path, "w") as f:
                    f.writelines(kept)


# -------------------------------------------------------------------------------------------------------
# the launcher (runs as root under /usr/bin/python3: `python3 -I envsim.py PLAN-JSON ARGV...`)

_libc = ctypes.CDLL(None, use_errno=True)


def _ok(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (src, target, fstype, data)]
    _ok(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    _ok(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), 0, 0), f"prctl {option}")


def _masked_proc() -> None:
    """A fresh procfs for this pid namespace, masked as runc masks it."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in MASKED_PATHS:
        if not os.path.lexists(path):
            continue
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY)
        else:
            _mount("/dev/null", path, None, MS_BIND)
    for path in READONLY_PATHS:
        if os.path.lexists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)


def _seccomp(plan: dict[str, Any]) -> None:
    """Load the filter while still root (CAP_SYS_ADMIN: no no_new_privs needed, as docker does it)."""
    if not (plan["seccomp_no_userns"] or plan["userns_no_mount"]):
        return
    import errno

    import seccomp

    f = seccomp.SyscallFilter(seccomp.ALLOW)
    f.set_attr(seccomp.Attr.CTL_NNP, 0)
    if plan["seccomp_no_userns"]:
        newuser = seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)
        f.add_rule(seccomp.ERRNO(errno.EPERM), "unshare", newuser)
        f.add_rule(seccomp.ERRNO(errno.EPERM), "clone", newuser)
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    if plan["userns_no_mount"]:
        for name in MOUNT_SYSCALLS:
            f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    f.load()


def _become(plan: dict[str, Any]) -> None:
    """The capabilities and the user, the filters last; then the caller execs."""
    _seccomp(plan)
    if plan["docker_caps"]:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
        for cap in range(last + 1):
            if not DOCKER_CAP_MASK >> cap & 1:
                _prctl(PR_CAPBSET_DROP, cap)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if plan["uid"] is not None:
        os.initgroups(plan["name"], plan["gid"])
        os.setresgid(plan["gid"], plan["gid"], plan["gid"])
        os.setresuid(plan["uid"], plan["uid"], plan["uid"])
    if plan["no_new_privs"]:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.chdir(plan["cwd"])


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)


def _identity_userns(plan: dict[str, Any]) -> None:
    """Enter a user namespace mapping every id to itself (the parent writes the maps), with
    user.max_user_namespaces=0 in it: nobody below can make a user namespace."""
    r, w = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # the mapper: waits until the launcher has unshared, writes its maps
        os.close(w)
        os.read(r, 1)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{parent}/{name}", "w") as f:
                f.write("0 0 4294967295\n")
        os._exit(0)
    os.close(r)
    _ok(_libc.unshare(CLONE_NEWUSER), "unshare user")
    os.write(w, b"G")
    os.close(w)
    if _wait(child) != 0:
        raise OSError("cannot map the identity user namespace")
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0\n")


def _launch(plan: dict[str, Any], argv: list[str]) -> int:
    env = dict(os.environ)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if plan["max_userns_zero"]:
        _identity_userns(plan)
    if plan["masked_proc"] or plan["store_on_overlay"]:
        _ok(_libc.unshare(CLONE_NEWNS | (CLONE_NEWPID if plan["masked_proc"] else 0)), "unshare")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if plan["store_on_overlay"]:
        b = plan["base"]
        opts = f"lowerdir={b}/lower,upperdir={b}/upper,workdir={b}/work"
        _mount("overlay", f"{b}/merged", "overlay", 0, opts)
    if not plan["masked_proc"]:
        _become(plan)
        os.execvpe(argv[0], argv, env)
    init = os.fork()  # pid 1 of the new pid namespace: mounts its /proc, starts the command, reaps
    if init:
        return _wait(init)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _masked_proc()
    cmd = os.fork()
    if cmd == 0:
        try:
            _become(plan)
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            print(f"envsim: {argv[0]}: {e}", file=sys.stderr)
        os._exit(127)
    while True:  # reap orphans until the command itself ends (then the namespace's others are killed)
        pid, status = os.wait()
        if pid == cmd:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    try:
        sys.exit(_launch(json.loads(sys.argv[1]), sys.argv[2:]))
    except OSError as e:
        print(f"envsim: {e}", file=sys.stderr)
        sys.exit(126)
