"""Shared test fixtures: unprivileged builders, a busybox base image, a loopback registry.

The product is for people who are not root, so every test that builds runs `rbuild` as an
unprivileged user. Started as root (CI), the session creates two users: one with a subuid/subgid
range and one without (the single-uid path); it removes exactly those users, their files and the
processes it started (by pid) when it ends. Started as an ordinary user, the tests run as that user
and the single-uid tests are skipped (they need root to create the user).

Fixture names:
  rb          Runner for the user with a subuid range (session store in rb.root)
  rb_single   Runner for the user without a range
  busybox     path of an OCI layout holding a static-busybox image (ref name "latest")
  registry    "127.0.0.1:PORT" of a docker-registry started for the session
Runner API: run(*args, cwd=, input=, env=, check=, root=) -> CompletedProcess (text);
  sh(script, ...) -> CompletedProcess; mkdir(name) -> path owned by the user;
  write(path, text_or_bytes, mode=0o644); context(files: dict) -> path; uid, gid, name, home, root.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest

IS_ROOT = os.getuid() == 0

# CI runs the property tests on a fixed sequence of examples, so a landing never depends on luck;
# a developer's run explores new ones each time.
hypothesis.settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")
BUSYBOX = "/bin/busybox"


def rbuild_bin() -> str:
    explicit = os.environ.get("RBUILD_BIN")
    if explicit:
        return explicit
    cand = os.path.join(os.path.dirname(sys.executable), "rbuild")
    if os.path.exists(cand):
        return cand
    found = shutil.which("rbuild")
    if not found:
        pytest.exit("rbuild is not installed next to this python; run the tests with the README's command", 2)
    return found


def _world_readable(path: str) -> bool:
    """Other users can run it: every parent directory searchable, the file itself readable."""
    p = os.path.realpath(path)
    if not os.stat(p).st_mode & 0o004:
        return False
    while p != "/":
        p = os.path.dirname(p)
        if not os.stat(p).st_mode & 0o001:
            return False
    return True


@dataclass
class Runner:
    name: str
    uid: int
    gid: int
    home: str
    base: str
    root: str
    bin: str
    has_range: bool
    _n: list[int] = field(default_factory=lambda: [0])

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "LANG": "C.UTF-8",
            "PATH": os.path.dirname(self.bin) + ":/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "RBUILD_ROOT": self.root,
        }
        if extra:
            env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def _prefix(self) -> list[str]:
        if not IS_ROOT:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--"]

    def run(
        self,
        *args: str,
        cwd: str | None = None,
        input: str | bytes | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
        root: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        argv = self._prefix() + [self.bin, *args]
        e = self._env(env)
        if root:
            e["RBUILD_ROOT"] = root
        text = not isinstance(input, bytes)
        res = subprocess.run(
            argv, cwd=cwd or self.base, input=input, env=e, capture_output=True, text=text, timeout=timeout, check=False
        )
        if check and res.returncode != 0:
            raise AssertionError(f"rbuild {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
        return res

    def sh(
        self,
        script: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        res = subprocess.run(
            self._prefix() + ["/bin/sh", "-c", script],
            cwd=cwd or self.base,
            env=self._env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"{script!r} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def mkdir(self, name: str | None = None) -> str:
        self._n[0] += 1
        path = os.path.join(self.base, name or f"d{self._n[0]}")
        if name and "/" not in name and os.path.exists(path):  # two tests of a session asking for "victim"
            path += str(self._n[0])
        os.makedirs(path, exist_ok=True)
        self.own(path)
        return path

    def own(self, path: str) -> None:
        if IS_ROOT:
            for dirpath, dirnames, filenames in os.walk(path):
                os.lchown(dirpath, self.uid, self.gid)
                for n in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, n), self.uid, self.gid)

    def write(self, path: str, content: str | bytes, mode: int = 0o644) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        os.chmod(path, mode)
        self.own(os.path.dirname(path))
        return path

    def context(self, files: dict[str, str | bytes]) -> str:
        """A fresh build context holding files (a 'Containerfile' key is the Containerfile)."""
        d = self.mkdir()
        for rel, content in files.items():
            self.write(os.path.join(d, rel), content)
        self.own(d)
        return d

    def build(
        self, ctx: str, *extra: str, check: bool = True, root: str | None = None, env: dict[str, str] | None = None
    ) -> str:
        res = self.run("build", "-q", *extra, ctx, check=check, root=root, env=env)
        return res.stdout.strip()

    def processes(self) -> list[str]:
        """Live processes ("PID NAME") running as this user or one of its subordinate ids (zombies are gone)."""
        uids = {self.uid}
        with open("/etc/subuid") as f:
            for line in f:
                name, _, rest = line.strip().partition(":")
                if name == self.name:
                    start, _, count = rest.partition(":")
                    uids |= set(range(int(start), int(start) + int(count)))
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = dict(ln.split(":", 1) for ln in f if ":" in ln)
            except OSError:
                continue
            if int(status["Uid"].split()[1]) in uids and not status["State"].strip().startswith("Z"):
                found.append(f"{pid} {status['Name'].strip()}")
        return found

    def fresh_root(self) -> str:
        return self.mkdir() + "/store"


def default_signals() -> None:
    """preexec_fn: a terminal's defaults. A shell running the suite in the background hands SIGINT down
    ignored, and a program started with SIGINT ignored rightly keeps ignoring it (POSIX)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def end_session(proc: subprocess.Popen) -> None:
    """End what a test started in its own session (start_new_session=True), if anything of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _make_user(name: str, with_range: bool) -> pwd.struct_passwd:
    argv = ["useradd", "-m", "-s", "/bin/sh", name]
    if not with_range:
        argv[1:1] = ["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"]
    subprocess.run(argv, check=True, capture_output=True)
    pw = pwd.getpwnam(name)
    if with_range and not _has_range(name):
        start = _free_subid_start()
        for f in ("/etc/subuid", "/etc/subgid"):
            with open(f, "a") as fh:
                fh.write(f"{name}:{start}:65536\n")
    return pw


def _has_range(name: str) -> bool:
    try:
        with open("/etc/subuid") as f:
            return any(line.split(":")[0] == name for line in f)
    except OSError:
        return False


def _free_subid_start() -> int:
    top = 100000
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit():
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


# fixtures that start builders, users or a registry: a test using one (even through another fixture) is e2e
E2E_FIXTURES = frozenset({"rb", "rb_single", "busybox", "registry", "_session"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test `e2e` (needs the builder users, run as root) or `unit` (`pytest -m unit`: fast, any user).

    A test that makes its own users or builds without these fixtures says so with @pytest.mark.e2e."""
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            continue
        names = getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.e2e if E2E_FIXTURES.intersection(names) else pytest.mark.unit)


@pytest.fixture(scope="session")
def _session() -> Iterator[dict[str, Runner]]:
    binpath = rbuild_bin()
    if IS_ROOT and not _world_readable(binpath):
        pytest.exit(
            f"{binpath} is not readable by other users: install rbuild into a world-readable prefix "
            "with /usr/bin/python3 (the README's test command does)",
            2,
        )
    base = tempfile.mkdtemp(prefix="rbtest-", dir="/var/tmp")
    os.chmod(base, 0o755)
    made: list[str] = []
    runners: dict[str, Runner] = {}
    try:
        if IS_ROOT:
            tag = f"{os.getpid() % 100000}"
            for kind, with_range in (("sub", True), ("single", False)):
                name = f"rbt{kind[:2]}{tag}"  # "rbtsu…", "rbtsi…": distinct names
                pw = _make_user(name, with_range)
                made.append(name)
                ubase = os.path.join(base, kind)
                os.mkdir(ubase, 0o700)
                os.chown(ubase, pw.pw_uid, pw.pw_gid)
                runners[kind] = Runner(
                    name, pw.pw_uid, pw.pw_gid, pw.pw_dir, ubase, os.path.join(ubase, "store"), binpath, with_range
                )
        else:
            pw = pwd.getpwuid(os.getuid())
            ubase = os.path.join(base, "sub")
            os.mkdir(ubase, 0o700)
            runners["sub"] = Runner(
                pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, ubase, os.path.join(ubase, "store"), binpath, True
            )
        yield runners
    finally:
        for r in runners.values():
            # runtime dirs rbuild, buildah, skopeo and podman's libraries make for the session's users
            for path in (
                f"/tmp/rbuild-{r.uid}",
                f"/tmp/podman-run-{r.uid}",
                f"/tmp/containers-user-{r.uid}",
                f"/var/tmp/podman-run-{r.uid}",
                f"/var/tmp/containers-user-{r.uid}",
            ):
                if IS_ROOT:  # only for users the session made: a developer's own dirs stay
                    shutil.rmtree(path, ignore_errors=True)
        if IS_ROOT:
            shutil.rmtree(base, ignore_errors=True)
            for name in made:
                subprocess.run(["userdel", "-r", name], capture_output=True, check=False)
                _drop_subid_lines(name)
        else:
            subprocess.run(
                [binpath, "unshare", "rm", "-rf", base],
                capture_output=True,
                check=False,
                env={**os.environ, "RBUILD_ROOT": os.path.join(base, "sub", "store")},
            )
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def rb(_session: dict[str, Runner]) -> Runner:
    return _session["sub"]


@pytest.fixture(scope="session")
def rb_single(_session: dict[str, Runner]) -> Runner:
    if "single" not in _session:
        pytest.skip("the single-uid user can only be created when the tests start as root")
    return _session["single"]


# -------------------------------------------------------------------------------------------------------
# a base image: Debian's static busybox in an OCI layout, made here with the standard library

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\nbin:x:1:1:bin:/bin:/bin/false\napp:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\nbin:x:1:\napp:x:1000:\nstaff:x:50:app\nnogroup:x:65534:\n"


def busybox_layer() -> bytes:
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(
            name: str,
            type_: bytes = tarfile.DIRTYPE,
            mode: int = 0o755,
            data: bytes = b"",
            link: str = "",
            uid: int = 0,
            gid: int = 0,
        ) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.uid, ti.gid, ti.linkname = type_, mode, 1700000000, uid, gid, link
            ti.size = len(data) if type_ == tarfile.REGTYPE else 0
            tf.addfile(ti, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)

        for d in ("bin", "etc", "home", "root", "tmp", "usr", "usr/bin", "var"):
            add(d, mode=0o1777 if d == "tmp" else (0o700 if d == "root" else 0o755))
        add("home/app", uid=1000, gid=1000)
        with open(BUSYBOX, "rb") as f:
            add("bin/busybox", tarfile.REGTYPE, 0o755, f.read())
        for a in sorted(set(applets)):
            if a != "busybox":
                add(f"bin/{a}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, PASSWD.encode())
        add("etc/group", tarfile.REGTYPE, 0o644, GROUP.encode())
    return buf.getvalue()


def write_oci_layout(
    path: str, layers: list[bytes], config_extra: dict | None = None, tag: str = "latest", compress: bool = True
) -> str:
    """An OCI image layout with the given uncompressed layer tars; returns the manifest digest."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        with open(os.path.join(path, "blobs", "sha256", h), "wb") as f:
            f.write(data)
        return "sha256:" + h

    descs, diff_ids = [], []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        blob = gzip.compress(raw, mtime=0) if compress else raw
        mt = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        descs.append({"mediaType": mt, "digest": put(blob), "size": len(blob)})
    config: dict[str, Any] = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "test layer"} for _ in layers],
    }
    if config_extra:
        config["config"].update(config_extra)
    cbytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(cbytes), "size": len(cbytes)},
        "layers": descs,
    }
    mbytes = json.dumps(manifest).encode()
    mdigest = put(mbytes)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                "digest": mdigest,
                "size": len(mbytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return mdigest


@pytest.fixture(scope="session")
def busybox(_session: dict[str, Runner]) -> str:
    """An OCI layout (world-readable) with busybox; FROM oci:<path> or pull it into a store."""
    if not os.path.exists(BUSYBOX):
        pytest.fail("Debian's busybox-static is not installed (the README's test command installs it)")
    base = os.path.dirname(_session["sub"].base)
    path = os.path.join(base, "busybox-layout")
    write_oci_layout(path, [busybox_layer()])
    for dirpath, _, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    return path


# -------------------------------------------------------------------------------------------------------
# a registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def docker_registry(extra_config: str = "") -> Iterator[str]:
    """Debian's docker-registry on a free loopback port; stopped by pid."""
    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.fail("docker-registry is not installed (the README's test command installs it)")
    d = tempfile.mkdtemp(prefix="rbtest-registry-")
    port = free_port()
    cfg = os.path.join(d, "config.yml")
    with open(cfg, "w") as f:
        f.write(
            f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
            f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra_config}"
        )
    log = open(os.path.join(d, "log"), "wb")
    proc = subprocess.Popen([exe, "serve", cfg], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start: " + open(os.path.join(d, "log")).read())
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def registry() -> Iterator[str]:
    with docker_registry() as addr:
        yield addr


DEBIAN_MIRROR = "http://deb.debian.org/debian"


@pytest.fixture(scope="session")
def debian_layout() -> Iterator[str]:
    """Debian bookworm minbase as an OCI layout (the Debian mirror is reachable in CI; nothing else is)."""
    work = tempfile.mkdtemp(prefix="rbtest-debian-", dir="/var/tmp")
    os.chmod(work, 0o755)
    try:
        rootfs = os.path.join(work, "rootfs")
        res = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR], capture_output=True, text=True
        )
        if res.returncode != 0:
            pytest.skip(f"debootstrap from {DEBIAN_MIRROR} failed (no Debian mirror?): {res.stderr.strip()[-300:]}")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(os.listdir(rootfs)):
                tf.add(os.path.join(rootfs, name), arcname=name)
        shutil.rmtree(rootfs)
        layout = os.path.join(work, "layout")
        write_oci_layout(layout, [buf.getvalue()], compress=False)
        subprocess.run(["chmod", "-R", "a+rX", layout], check=True)
        yield layout
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def fuse_open_to_users() -> Iterator[None]:
    """/dev/fuse open to the test users while it runs (0666 as on common distributions; root-only on this
    machine); the mode it had is put back."""
    orig = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if orig & 0o006 != 0o006:
        if not IS_ROOT:
            pytest.skip("/dev/fuse is not open to users, and changing its mode needs root")
        os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        if stat.S_IMODE(os.stat("/dev/fuse").st_mode) != orig:
            os.chmod("/dev/fuse", orig)


@pytest.fixture
def dev_fuse() -> Iterator[None]:
    """fuse_open_to_users for one test (test modules that mount many times open it per module)."""
    with fuse_open_to_users():
        yield
