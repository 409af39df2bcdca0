"""What this machine and process allow, found by trying (issue 11): the checks behind `rbuild doctor`
and the rung of the strategy ladder a build can use.

Every probe that could disturb the caller (unshare, mounts, newuidmap) runs in a forked child, the
caller being single-threaded; nothing compares kernel versions. Results are cached in the runtime
directory, keyed by everything they depend on: kernel release, the storage directory's filesystem,
uid, the process's capabilities, seccomp and no_new_privs state, its namespaces and id map, the
subordinate id files and /dev/fuse's mode.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

from rootless.env.userns import sub_ranges, userns_gate
from rootless.kernel import linux
from rootless.kernel.fsutil import atomic_write
from rootless.layer.format import OVERLAY
from rootless.rootfs import fusehelper

CACHE_VERSION = 3
CAP_CHOWN, CAP_FOWNER, CAP_MKNOD, CAP_SYS_CHROOT, CAP_SYS_ADMIN = 0, 3, 27, 18, 21
FULL_MAP = "0 0 4294967295"
# statfs f_type of the filesystems whose names matter to a remedy
FS_NAMES = {
    0x794C7630: "overlayfs",
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x01021994: "tmpfs",
    0x6969: "nfs",
    0x65735546: "fuse",
    0x2FC12FC1: "zfs",
}
RUNGS = {
    1: "user namespace + kernel overlay",
    2: "user namespace + FUSE overlay helper",
    3: "user namespace + copy root",
    4: "no user namespace, root's capabilities (no mounts)",
    5: "no user namespace, no privilege (RUN-less builds)",
}
NNP_REMEDY = (
    "no_new_privs defeats setuid newuidmap: Kubernetes securityContext.allowPrivilegeEscalation: true; "
    "docker/podman: drop --security-opt no-new-privileges"
)
PROC_REMEDY = (
    "unmask /proc: docker/podman run --security-opt systempaths=unconfined; Kubernetes: "
    "securityContext.procMount: Unmasked (with hostUsers: false)"
)
MOUNT_REMEDY = (
    "allow mount(2) in user namespaces: a seccomp profile permitting mount, umount2, open_tree, fsopen, fsmount, "
    "move_mount, mount_setattr (docker/podman --security-opt seccomp=unconfined; Kubernetes "
    "securityContext.seccompProfile.type: Unconfined)"
)
OVERLAY_REMEDY = (
    "put the store on a volume that is not overlayfs/NFS/FUSE: --root DIR (docker -v /host/dir:/store, "
    "Kubernetes an emptyDir volume) or RBUILD_ROOT"
)
FUSE_REMEDY = "chmod 0666 /dev/fuse (docker/podman: --device /dev/fuse; Kubernetes: a device plugin exposing /dev/fuse)"


@dataclass(frozen=True)
class Check:
    """One finding: ok, what was seen, and the exact fix when not ok."""

    name: str
    ok: bool
    detail: str
    remedy: str = ""


@dataclass(frozen=True)
class Probe:
    """All checks of one process in one environment, plus the facts the rung choice needs."""

    checks: tuple[Check, ...]
    real_root: bool
    userns: bool
    root_caps: bool  # CAP_CHOWN, CAP_FOWNER, CAP_MKNOD, CAP_SYS_CHROOT without a new user namespace
    storage_writable: bool
    layer_format: str | None = None  # the format a new store here would take (tried in the namespace)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, object]) -> Probe:
        raw = data["checks"]
        if not isinstance(raw, list | tuple):
            raise ValueError("checks is not a list")
        return Probe(
            tuple(Check(**c) for c in raw),
            bool(data["real_root"]),
            bool(data["userns"]),
            bool(data["root_caps"]),
            bool(data["storage_writable"]),
            str(data["layer_format"]) if data.get("layer_format") else None,
        )


@dataclass(frozen=True)
class Choice:
    """The rung a build uses, whether RUN works there, and why each better rung was skipped."""

    rung: int
    run_possible: bool
    skipped: tuple[str, ...]


def choose(probe: Probe, layer_format: str | None = None) -> Choice:
    """The best rung the probe allows (a pure function: builds call it with the cached probe, so `doctor`
    and a build decide once, the same way). `layer_format`: the store's, when it exists (a store in rbuild's
    xattr format cannot be mounted by kernel overlay); without one, the format a new store would take there."""

    skipped: list[str] = []

    def why(rung: int, *names: str, extra: str = "") -> None:
        failed = [f"{c.name}: {c.detail}" for c in probe.checks if c.name in names and not c.ok]
        skipped.append(f"rung {rung} ({RUNGS[rung]}): " + "; ".join(failed + ([extra] if extra else [])))

    if not probe.storage_writable:
        return Choice(5, False, (f"storage: {probe.check('storage').detail}",))
    namespaced = probe.userns or probe.real_root
    layer_format = layer_format or probe.layer_format
    overlay_format = layer_format in (None, OVERLAY.name)
    if namespaced and probe.check("overlay").ok and overlay_format:
        return Choice(1, True, ())
    fmt = "" if overlay_format else f"the store's layers are in the {layer_format} format"
    why(1, "user_namespace", "overlay", extra=fmt)
    if namespaced and probe.check("mount").ok and probe.check("fuse").ok and overlay_format:
        return Choice(2, True, tuple(skipped))
    why(2, "user_namespace", "mount", "fuse", extra=fmt)
    if namespaced:
        return Choice(3, True, tuple(skipped))
    why(3, "user_namespace")
    if probe.root_caps:
        return Choice(4, True, tuple(skipped))
    why(4, "capabilities", extra="needs CAP_CHOWN, CAP_FOWNER, CAP_MKNOD and CAP_SYS_CHROOT")
    return Choice(5, False, tuple(skipped))


# -------------------------------------------------------------------------------------------------------
# process state


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (ln.partition(":") for ln in f)}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _fs_type(path: str) -> str:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return "unknown"
    ftype = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    return FS_NAMES.get(ftype, hex(ftype))


def _existing(path: str) -> str:
    """The storage directory, or its nearest existing ancestor (doctor never creates a store)."""
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def _cache_key(storage: str) -> str:
    st = _status()
    base = _existing(storage)
    parts = [
        str(CACHE_VERSION),
        os.uname().release,
        f"{os.stat(base).st_dev}:{_fs_type(base)}:{base}:{os.access(base, os.W_OK | os.X_OK)}",
        str(os.getuid()),
        st.get("CapEff", ""),
        st.get("NoNewPrivs", ""),
        st.get("Seccomp", ""),
        st.get("Seccomp_filters", ""),
        _read("/proc/self/uid_map"),
        os.environ.get("PATH", ""),  # which newuidmap
        os.environ.get("XDG_RUNTIME_DIR", ""),
        str(fusehelper.helper_path()),
    ]
    for ns in ("user", "mnt", "pid"):
        try:
            parts.append(os.readlink(f"/proc/self/ns/{ns}"))
        except OSError:
            parts.append("")
    for path in ("/etc/subuid", "/etc/subgid", "/dev/fuse"):
        try:
            s = os.stat(path)
            parts.append(f"{s.st_mtime_ns}:{s.st_mode:o}")
        except OSError:
            parts.append("-")
    return "|".join(parts)


# -------------------------------------------------------------------------------------------------------
# probes in forked children


def _in_child(fn: Callable[[], dict[str, object]]) -> dict[str, object]:
    """fn() in a forked child; its JSON-able result (a crash or a kill comes back as {"error": ...})."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            out = fn()
        except BaseException as e:  # the child must never return into the caller's code
            out = {"error": str(e)}
            code = 1
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    try:
        result = json.loads(data)
    except ValueError:
        return {"error": "the probe died"}
    return result if isinstance(result, dict) else {"error": "the probe died"}


def _errno_name(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _namespace_probe(base: str | None, real_root: bool) -> dict[str, object]:
    """In the child: a user namespace (single-uid map), then a mount, overlay on the storage filesystem
    and a fresh procfs in a new pid namespace (base None: no writable storage, the namespace alone);
    each result as an errno string or ""."""
    out: dict[str, object] = {}
    uid, gid = os.getuid(), os.getgid()
    try:
        linux.unshare(linux.CLONE_NEWNS if real_root else linux.CLONE_NEWUSER | linux.CLONE_NEWNS)
    except OSError as e:
        return {"userns": e.errno}
    out["userns"] = 0
    if not real_root:
        try:  # AppArmor's restrict_unprivileged_userns lets unshare through but denies what follows
            for name, line in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1\n"), ("gid_map", f"0 {gid} 1\n")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(line)
        except OSError as e:
            return {"userns": e.errno}
    if base is None:
        return out
    tmp = tempfile.mkdtemp(prefix=".rbuild-probe-", dir=base)
    try:
        for d in ("l", "u", "w", "m", "p"):
            os.mkdir(os.path.join(tmp, d))
        try:
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            linux.mount("tmpfs", os.path.join(tmp, "p"), "tmpfs")
            linux.umount(os.path.join(tmp, "p"))
            out["mount"] = ""
        except OSError as e:
            out["mount"] = _errno_name(e)
            return out
        try:
            opts = f"lowerdir={tmp}/l,upperdir={tmp}/u,workdir={tmp}/w,userxattr"
            linux.mount("overlay", os.path.join(tmp, "m"), "overlay", 0, opts)
            linux.umount(os.path.join(tmp, "m"))
            out["overlay"] = ""
        except OSError as e:
            out["overlay"] = _errno_name(e)
        from rootless.layer.format import for_directory

        out["layer_format"] = for_directory(tmp).name
        out["fuse"] = _fuse_probe(tmp)  # before the pid namespace probe: forks fail once its init is gone
        out["proc"] = _proc_probe(os.path.join(tmp, "p"))
    finally:
        for dirpath, dirnames, _ in os.walk(tmp):
            for d in dirnames:  # overlay's work/work is mode 0
                os.chmod(os.path.join(dirpath, d), 0o700)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_FUSE_NEEDS = ("storage", "user_namespace", "mount")  # checks whose failure stops the FUSE mount probe


def _fuse_probe(tmp: str) -> str:
    """The FUSE helper serving a tree from `tmp` as a build would (in this namespace): "" or why not."""
    if fusehelper.helper_path() is None:
        return "the helper was not built"
    from rootless.errors import RbuildError
    from rootless.rootfs import fuse

    for d in ("fu", "fw", "fm"):
        os.mkdir(os.path.join(tmp, d))
    try:
        with fuse.serving([f"{tmp}/l"], f"{tmp}/fu", f"{tmp}/fw", f"{tmp}/fm"):
            pass
    except RbuildError as e:
        return str(e)
    return ""


def _proc_probe(target: str) -> str:
    """A fresh procfs in a new pid namespace (masked /proc in a container refuses it)."""
    try:
        linux.unshare(linux.CLONE_NEWPID)
    except OSError as e:
        return _errno_name(e)
    pid = os.fork()
    if pid == 0:
        try:
            linux.mount("proc", target, "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
            linux.umount(target)
            os._exit(0)
        except OSError as e:
            os._exit(e.errno or 1)
        except BaseException:
            os._exit(255)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "" if code == 0 else os.strerror(code) if code < 255 else "failed"


def _map_attempt(uid_ranges: list[tuple[int, int]], gid_ranges: list[tuple[int, int]]) -> str:
    """newuidmap and newgidmap on a real child in a new user namespace: "" when both worked, else why."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(go_w)
            linux.unshare(linux.CLONE_NEWUSER)
            os.write(w, b"R")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    why = ""
    try:
        if os.read(r, 1) != b"R":
            return "cannot create a user namespace"
        for tool, own, ranges in (("newuidmap", os.getuid(), uid_ranges), ("newgidmap", os.getgid(), gid_ranges)):
            argv = [tool, str(pid), "0", str(own), "1"]
            inside = 1
            for start, count in ranges:
                argv += [str(inside), str(start), str(count)]
                inside += count
            res = subprocess.run(argv, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                why = f"{tool}: {res.stderr.strip() or res.returncode}"
                break
    finally:
        os.close(r)
        os.close(go_w)
        os.waitpid(pid, 0)
    return why


# -------------------------------------------------------------------------------------------------------


def _free_start() -> int:
    """The first id after every range given out (the START of the subuid line a remedy suggests)."""
    top = 100000
    for path in ("/etc/subuid", "/etc/subgid"):
        for start, count in sub_ranges(path, _all_names(path)):
            top = max(top, start + count)
    return top


def _all_names(path: str) -> set[str]:
    try:
        with open(path) as f:
            return {ln.split(":", 1)[0] for ln in f if ":" in ln}
    except OSError:
        return set()


def _helper_check(tool: str, nnp: bool) -> tuple[bool, str]:
    path = shutil.which(tool)
    if path is None:
        return False, f"{tool} not found (install the uidmap package)"
    st = os.stat(path)
    setuid = bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0
    try:
        caps = bool(os.getxattr(path, "security.capability"))
    except OSError:
        caps = False
    if not (setuid or caps):
        return False, f"{path} is neither setuid root nor has file capabilities"
    if nnp:
        return False, f"{path} is {'setuid' if setuid else 'file-capable'}, but no_new_privs is set"
    return True, f"{path} ({'setuid root' if setuid else 'file capabilities'})"


def _runtime_check(uid: int) -> Check:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(xdg, "rbuild") if xdg else f"/tmp/rbuild-{uid}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Check("runtime_dir", True, f"{path} (created on first use)")
    except OSError as e:
        return Check("runtime_dir", False, f"{path}: {e.strerror}", "set XDG_RUNTIME_DIR to a private directory")
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        owner = f"uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
        return Check(
            "runtime_dir",
            False,
            f"{path} is not ours ({owner}): rbuild uses a private {path}-XXXXXXXX instead",
            f"remove {path} (its owner or root can), or set XDG_RUNTIME_DIR to a private directory",
        )
    return Check("runtime_dir", True, path)


def _cache_path() -> str | None:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    d = os.path.join(xdg, "rbuild") if xdg else f"/tmp/rbuild-{os.getuid()}"
    try:
        os.mkdir(d, 0o700)  # where builds would make it; a name someone else took stays theirs
    except OSError:
        pass
    try:
        st = os.lstat(d)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None  # only a private runtime directory holds it (nobody else can plant a result)
    return os.path.join(d, "probe.json")


def probe(storage: str, use_cache: bool = True) -> Probe:
    """Probe this process's environment for a store at `storage` (cached; see the module docstring)."""
    key = _cache_key(storage)
    cache = _cache_path() if use_cache else None
    if cache:
        try:
            with open(cache) as f:
                data = json.load(f)
            if data.get("key") == key:
                return Probe.from_json(data["probe"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    result = _probe(storage)
    if cache:
        try:
            atomic_write(cache, json.dumps({"key": key, "probe": result.to_json()}).encode())
        except OSError:
            pass
    return result


def _probe(storage: str) -> Probe:
    st = _status()
    uid = os.getuid()
    cap_eff = int(st.get("CapEff", "0"), 16)
    nnp = st.get("NoNewPrivs") == "1"
    uid_map = " ".join(_read("/proc/self/uid_map").split())
    real_root = uid == 0 and bool(cap_eff >> CAP_SYS_ADMIN & 1) and uid_map == FULL_MAP
    root_caps = all(cap_eff >> c & 1 for c in (CAP_CHOWN, CAP_FOWNER, CAP_MKNOD, CAP_SYS_CHROOT))
    checks = [Check("kernel", True, f"{os.uname().sysname} {os.uname().release} {os.uname().machine}")]
    who = "real root" if real_root else ("uid 0 without CAP_SYS_ADMIN (a container)" if uid == 0 else f"uid {uid}")
    checks.append(Check("capabilities", True, f"{who}; CapEff {cap_eff:#x}; uid_map {uid_map}"))

    base = _existing(storage)
    fs = _fs_type(base)
    writable = os.access(base, os.W_OK | os.X_OK)
    where = storage if base == storage else f"{storage} (to be created in {base})"
    checks.append(
        Check(
            "storage",
            writable,
            f"{where} on {fs}" + ("" if writable else ": not writable"),
            "" if writable else "--root DIR on a writable volume (or RBUILD_ROOT)",
        )
    )
    ns = _in_child(lambda: _namespace_probe(base if writable else None, real_root))
    err = ns.get("userns")
    userns = err == 0
    if "error" in ns:
        checks.append(Check("user_namespace", False, f"the probe failed: {ns['error']}", ""))
        userns = False
    elif userns:
        checks.append(Check("user_namespace", True, "not needed (real root)" if real_root else "allowed"))
    else:
        gate, remedy = userns_gate(int(err) if isinstance(err, int) else 0)
        checks.append(Check("user_namespace", False, f"refused: {gate}", remedy))

    if not userns or not writable:
        why = "needs a user namespace" if not userns else "not tried: the storage is not writable"
        checks.extend(Check(name, False, why) for name in ("mount", "overlay", "proc"))
    else:
        m = str(ns.get("mount", ""))
        checks.append(
            Check("mount", not m, f"mount(2) in the build's namespace: {m or 'allowed'}", MOUNT_REMEDY if m else "")
        )
        for name, what, remedy in (
            ("overlay", f"overlay on {fs} ({base})", OVERLAY_REMEDY),
            ("proc", "a fresh /proc in a new pid namespace", PROC_REMEDY),
        ):
            if m:
                checks.append(Check(name, False, f"{what}: not tried (mount(2) is refused)"))
                continue
            err = str(ns.get(name, ""))
            detail = f"{what}: {err or 'works'}"
            if err and name == "proc":
                detail += " (RUN shares this /proc: its processes see the container's)"
            checks.append(Check(name, not err, detail, remedy if err else ""))

    helper = fusehelper.helper_path()
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
        dev = ""
    except OSError as e:
        dev = f"/dev/fuse: {e.strerror}"
    served = ns.get("fuse")
    if dev:
        checks.append(Check("fuse", False, dev, FUSE_REMEDY))
    elif helper is None:
        checks.append(
            Check("fuse", False, "/dev/fuse usable; the helper was not built", "reinstall rbuild with libfuse3-dev")
        )
    elif served is None:
        skip = "mount(2) is refused" if ns.get("mount") else ("needs a user namespace" if not userns else "no storage")
        remedy = next((c.remedy for c in checks if not c.ok and c.remedy and c.name in _FUSE_NEEDS), MOUNT_REMEDY)
        checks.append(
            Check("fuse", False, f"/dev/fuse usable; helper {helper}; a FUSE mount: not tried ({skip})", remedy)
        )
    elif served:
        checks.append(Check("fuse", False, f"/dev/fuse usable; helper {helper}; but {served}", MOUNT_REMEDY))
    else:
        checks.append(Check("fuse", True, f"/dev/fuse usable; helper {helper}; a FUSE overlay mount on {fs} works"))

    checks.extend(_id_checks(uid, real_root, userns, nnp))
    notif = "user_notif" in _read("/proc/sys/kernel/seccomp/actions_avail").split()
    checks.append(Check("seccomp_notify", notif, "SECCOMP_RET_USER_NOTIF " + ("available" if notif else "missing")))
    checks.append(_runtime_check(uid))
    fmt = ns.get("layer_format")
    return Probe(
        tuple(checks),
        real_root,
        userns and not real_root,
        root_caps and uid == 0,
        writable,
        fmt if isinstance(fmt, str) else None,
    )


def _id_checks(uid: int, real_root: bool, userns: bool, nnp: bool) -> list[Check]:
    """newuidmap/newgidmap, the subordinate ranges, and a real mapping attempt."""
    if real_root:
        return [Check("id_mapping", True, "real root: every id is available")]
    import pwd

    names = {str(uid)}
    try:
        user = pwd.getpwuid(uid).pw_name
        names.add(user)
    except KeyError:
        user = str(uid)
    out = []
    helpers_ok = True
    for tool in ("newuidmap", "newgidmap"):
        ok, detail = _helper_check(tool, nnp)
        helpers_ok &= ok
        remedy = "" if ok else (NNP_REMEDY if nnp and "no_new_privs" in detail else "apt-get install uidmap")
        out.append(Check(tool, ok, detail, remedy))
    uids = sub_ranges("/etc/subuid", names)
    gids = sub_ranges("/etc/subgid", names)
    line = f"{user}:{_free_start()}:65536"
    fix = f"add '{line}' to /etc/subuid and /etc/subgid (usermod --add-subuids/--add-subgids)"
    for label, ranges in (("subuid", uids), ("subgid", gids)):
        total = sum(c for _, c in ranges)
        if not ranges:
            out.append(Check(label, False, f"no range for {user} in /etc/{label}: single-uid builds only", fix))
        elif total < 65536:
            out.append(Check(label, False, f"{total} ids for {user}: images using higher ids fail", fix))
        else:
            out.append(Check(label, True, ", ".join(f"{s}:{c}" for s, c in ranges)))
    if not (userns and helpers_ok and uids and gids):
        out.append(Check("id_mapping", userns, "the single-uid map" if userns else "no user namespace"))
        return out
    why = _map_attempt(uids, gids)
    if why:
        out.append(Check("id_mapping", False, f"{why} (falls back to the single-uid map)", fix))
    else:
        out.append(Check("id_mapping", True, f"{1 + sum(c for _, c in uids)} uids mapped"))
    return out
