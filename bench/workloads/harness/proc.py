"""Running commands as the unprivileged bench user, timed, with the peak memory of the whole process tree.

Peak memory: a sampler thread polls /proc every 10 ms (50 ms after the first 2 s) for every process in
the command's session (it starts in a new session) or descending from it, and sums their PSS from
/proc/PID/smaps_rollup (RSS too). PSS splits shared pages between the processes mapping them, so the sum
does not count shared libraries once per process. A process living shorter than the interval can be
missed, so wait4()'s ru_maxrss is recorded as well: the largest single process among the command and
its reaped descendants (a lower bound of the tree's peak, never a sum).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import resource
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

IS_ROOT = os.getuid() == 0


@dataclass
class User:
    """The unprivileged user every build runs as."""

    name: str
    uid: int
    gid: int
    home: str
    created: bool = False  # made by this run: removed (with its subid lines) at the end

    def prefix(self) -> list[str]:
        """argv prefix switching to the user (nothing when the harness already is that user)."""
        if os.getuid() == self.uid:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--"]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean login-like environment (no XDG_RUNTIME_DIR: both builders fall back to /tmp)."""
        env = {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "LANG": "C.UTF-8",
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        }
        for k in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
            if k in os.environ:
                env[k] = os.environ[k]
        if extra:
            env.update(extra)
        return env

    def chown_tree(self, path: str) -> None:
        """Give a tree to the user (a no-op unless root)."""
        if not IS_ROOT:
            return
        os.lchown(path, self.uid, self.gid)
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), self.uid, self.gid)


def _has_range(name: str) -> bool:
    with contextlib.suppress(OSError), open("/etc/subuid") as f:
        return any(line.split(":")[0] == name for line in f)
    return False


def _free_subid_start() -> int:
    top = 100000
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    top = max(top, int(parts[1]) + int(parts[2]))
    return top


def take_user(name: str | None) -> User:
    """The named existing user; or, as root with no name, a new user rbbNNNNN with a subuid range."""
    if name:
        pw = pwd.getpwnam(name)
        return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
    if not IS_ROOT:
        pw = pwd.getpwuid(os.getuid())
        return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
    name = f"rbb{os.getpid() % 100000}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    pw = pwd.getpwnam(name)
    user = User(name, pw.pw_uid, pw.pw_gid, pw.pw_dir, created=True)
    if not _has_range(name):
        start = _free_subid_start()
        for f in ("/etc/subuid", "/etc/subgid"):
            with open(f, "a") as fh:
                fh.write(f"{name}:{start}:65536\n")
    return user


def drop_user(user: User) -> None:
    """Remove a user this run created: its processes must be gone; home, runtime dirs and subid lines go."""
    if not user.created:
        return
    for d in (
        f"/tmp/rbuild-{user.uid}",
        f"/tmp/containers-user-{user.uid}",
        f"/tmp/storage-run-{user.uid}",
        f"/tmp/podman-run-{user.uid}",
        f"/run/user/{user.uid}",
    ):
        if os.path.isdir(d) and os.stat(d).st_uid == user.uid:
            subprocess.run(["rm", "-rf", "--one-file-system", d], check=False)
    subprocess.run(["userdel", "-r", user.name], capture_output=True, check=False)
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError):
            with open(path) as f:
                lines = f.readlines()
            kept = [ln for ln in lines if ln.split(":")[0] != user.name]
            if kept != lines:
                with open(path, "w") as f:
                    f.writelines(kept)


# -------------------------------------------------------------------------------------------------------
# measured runs


@dataclass
class Sample:
    """One timed command."""

    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    peak_pss_mib: float  # sum over the process tree, sampled
    peak_rss_mib: float  # sum over the process tree, sampled (counts shared pages once per process)
    maxrss_mib: float  # wait4: the largest single process
    returncode: int
    error: str = ""
    samples: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float):
                d[k] = round(v, 4)
        if not d["extra"]:
            del d["extra"]
        if not d["error"]:
            del d["error"]
        return d


def _stat(pid: str) -> tuple[int, int] | None:
    """(ppid, session) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2 :].split()
    return int(rest[1]), int(rest[3])


def _mem_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB from smaps_rollup; zeros for kernel threads or vanished processes."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith(b"Rss:"):
                    rss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return pss, rss


def tree_pids(root: int) -> set[int]:
    """The processes in root's session or descending from root."""
    parents: dict[int, int] = {}
    members = {root}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(entry)
        if st is None:
            continue
        pid = int(entry)
        parents[pid] = st[0]
        if st[1] == root:
            members.add(pid)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in members and pid not in members:
                members.add(pid)
                changed = True
    return members


class _Sampler(threading.Thread):
    def __init__(self, root: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.deadline = deadline
        self.stop = threading.Event()
        self.peak_pss = self.peak_rss = 0
        self.count = 0
        self.timed_out = False

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            pss = rss = 0
            for pid in tree_pids(self.root):
                p, r = _mem_kib(pid)
                pss += p
                rss += r
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self.count += 1
            now = time.monotonic()
            if now > self.deadline and not self.timed_out:
                self.timed_out = True
                with contextlib.suppress(OSError):
                    os.killpg(self.root, signal.SIGKILL)
            self.stop.wait(0.01 if now - start < 2 else 0.05)


def run_measured(
    argv: list[str], env: dict[str, str], cwd: str, timeout: float = 3600, log: str | None = None
) -> Sample:
    """Run argv to completion; wall time, CPU time of the reaped tree, peak memory; output kept in log."""
    with tempfile.TemporaryFile() as tmp:
        out = open(log, "ab") if log else tmp  # noqa: SIM115
        try:
            out.write(("$ " + " ".join(argv) + "\n").encode())
            out.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            sampler = _Sampler(proc.pid, time.monotonic() + timeout)
            sampler.start()
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            sampler.stop.set()
            sampler.join()
            with contextlib.suppress(OSError):  # stragglers (there should be none)
                os.killpg(proc.pid, signal.SIGKILL)
            error = ""
            if proc.returncode != 0:
                out.flush()
                error = _tail(log, tmp)
                if sampler.timed_out:
                    error = f"timed out after {timeout:.0f} s; " + error
        finally:
            if log:
                out.close()
    return Sample(
        wall,
        ru.ru_utime,
        ru.ru_stime,
        sampler.peak_pss / 1024,
        sampler.peak_rss / 1024,
        ru.ru_maxrss / 1024,
        proc.returncode,
        error,
        sampler.count,
    )


def _tail(log: str | None, tmp: object, lines: int = 12) -> str:
    try:
        if log:
            with open(log, "rb") as f:
                f.seek(max(0, os.path.getsize(log) - 8192))
                data = f.read()
        else:
            tmp.seek(0)  # type: ignore[attr-defined]
            data = tmp.read()[-8192:]  # type: ignore[attr-defined]
    except OSError:
        return ""
    text = data.decode(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


def run(
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    check: bool = True,
    timeout: float = 3600,
) -> subprocess.CompletedProcess[str]:
    """Run quietly; on failure raise with the output."""
    res = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-4000:]}")
    return res


def children_maxrss_mib() -> float:
    """getrusage(RUSAGE_CHILDREN).ru_maxrss of the harness (largest child ever): for the record only."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
