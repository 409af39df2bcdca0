"""rbuild where a user namespace or a fresh /proc is not available (issue 11), in recreated environments.

Each environment is made for real by a launcher run as root with Debian's /usr/bin/python3: a private
mount namespace with runc's masked /proc paths, docker's default capability bounding set (no
CAP_SYS_ADMIN), a seccomp filter that makes unshare/clone with CLONE_NEWUSER (or mount) fail with EPERM,
no_new_privs; then it becomes the unprivileged user (or stays "container root") and execs rbuild.
Images are compared with the baseline the `rb` user (subuid range, overlay) builds, via tests/ocitree.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import ocitree  # noqa: E402
from conftest import IS_ROOT, Runner  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="recreating container environments needs root"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the test's seccomp filter is written for x86_64"),
]

LAUNCHER = r"""
import ctypes, json, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))

cfg = json.loads(sys.argv[1])
if cfg.get("mountns"):
    check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
    check(libc.mount(None, b"/", None, (1 << 14) | (1 << 18), None), "make / private")
for path in cfg.get("mask", []):  # runc's masked paths: tmpfs over directories, /dev/null over files
    if os.path.isdir(path):
        check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", 1, b"size=0"), "mask " + path)
    elif os.path.exists(path):
        check(libc.mount(b"/dev/null", path.encode(), None, 4096, None), "mask " + path)
if cfg.get("seccomp"):  # installed while root still has CAP_SYS_ADMIN, as a container runtime does
    NEWUSER, EPERM, ENOSYS = 0x10000000, 1, 38
    ALLOW, ERR = 0x7FFF0000, 0x00050000
    block_mount = "mount" in cfg["seccomp"]
    prog = [
        (0x20, 0, 0, 4),  # A = arch
        (0x15, 0, 5, 0xC000003E),  # not x86_64: allow
        (0x20, 0, 0, 0),  # A = syscall number
        (0x15, 4, 0, 272),  # unshare -> check flags
        (0x15, 3, 0, 56),  # clone -> check flags
        (0x15, 6, 0, 435),  # clone3 -> ENOSYS (glibc falls back to clone), as docker does
        (0x15, 4 if block_mount else 1, 0, 165),  # mount -> EPERM when asked
        (0x06, 0, 0, ALLOW),
        (0x20, 0, 0, 16),  # A = low word of the first argument
        (0x45, 1 if "userns" in cfg["seccomp"] else 0, 0, NEWUSER),
        (0x06, 0, 0, ALLOW),
        (0x06, 0, 0, ERR | EPERM),
        (0x06, 0, 0, ERR | ENOSYS),
    ]
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    check(libc.prctl(22, 2, ctypes.addressof(fbuf), 0, 0), "seccomp")
if cfg.get("caps"):  # the bounding set; root's permitted set after exec is what it keeps
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in cfg["caps"]:
            check(libc.prctl(24, cap, 0, 0, 0), "PR_CAPBSET_DROP")
if "uid" in cfg:
    os.setgroups([])
    os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
    os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
if cfg.get("no_new_privs"):
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
os.execve(sys.argv[2], sys.argv[2:], cfg["env"])
"""

RUNC_MASKS = ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/scsi"]
# docker's default capabilities: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE
# NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP
DOCKER_CAPS = [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31]


def launch(
    tmp: str,
    cfg: Mapping[str, object],
    args: list[str],
    user: Runner | None,
    env: dict[str, str],
    check: bool = True,
    python: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `rbuild ARGS` (`python ARGS`: rbuild's python) in the environment `cfg` describes, as `user`
    (None: container root)."""
    launcher = os.path.join(tmp, "launch.py")
    if not os.path.exists(launcher):
        with open(launcher, "w") as f:
            f.write(LAUNCHER)
    full = dict(cfg)
    if user is not None:
        full.update(uid=user.uid, gid=user.gid)
        base_env = user._env(env)
    else:
        base_env = {"HOME": "/root", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", **env}
    full["env"] = base_env
    binpath = user.bin if user is not None else _bin()
    if python:
        binpath = os.path.join(os.path.dirname(binpath), "python")
    res = subprocess.run(
        ["/usr/bin/python3", "-I", launcher, json.dumps(full), binpath, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd="/",
    )
    if check and res.returncode != 0:
        raise AssertionError(f"rbuild {' '.join(args)} in {cfg} failed ({res.returncode}):\n{res.stderr}")
    return res


def _bin() -> str:
    from conftest import rbuild_bin

    return rbuild_bin()


FULL = """FROM oci:{busybox}
RUN mkdir -p /data/sub /opq && echo x > /data/sub/f && echo y > /opq/old && chown -R 1000:1000 /data \\
    && ln -s /data/sub/f /link
COPY --chown=1000:1000 a.txt /home/app/a.txt
USER app
RUN echo hi > /home/app/b.txt && id -u > /home/app/uid
USER root
RUN (sleep 4242 &) ; rm -rf /opq && mkdir /opq && echo new > /opq/new && rm /home/app/a.txt
LABEL rung=test
"""


def _tree_and_config(layout: str) -> tuple[ocitree.Tree, dict[str, object]]:
    img = ocitree.load(layout)
    return ocitree.flatten(img.layers), ocitree.compared_config(img)


def _baseline(user: Runner, containerfile: str, files: dict[str, str]) -> tuple[ocitree.Tree, dict[str, object]]:
    ctx = user.context({"Containerfile": containerfile, **files})
    image = user.build(ctx)
    layout = os.path.join(user.mkdir(), "layout")
    user.run("push", image, f"oci:{layout}")
    return _tree_and_config(layout)


def _no_leftover_sleep() -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        assert cmd[:2] != [b"sleep", b"4242"], f"a RUN's background process {pid} outlived the build"


@pytest.fixture
def ctroot_dirs(tmp_path: object) -> dict[str, str]:
    base = str(tmp_path)
    dirs = {k: os.path.join(base, k) for k in ("store", "run", "ctx", "out")}
    for d in dirs.values():
        os.makedirs(d)
    os.chmod(dirs["run"], 0o700)
    return dirs


def test_container_root_without_sys_admin_builds_in_a_user_namespace(
    rb: Runner, busybox: str, ctroot_dirs: dict[str, str]
) -> None:
    """Root in a rootful container (docker's caps, masked /proc) is no real root: it maps a user namespace
    itself, RUN shares the pid namespace where a fresh /proc is refused; the image equals the baseline."""
    cf = FULL.format(busybox=busybox)
    files = {"a.txt": "a\n"}
    want = _baseline(rb, cf, files)
    for name, text in {"Containerfile": cf, **files}.items():
        with open(os.path.join(ctroot_dirs["ctx"], name), "w") as f:
            f.write(text)
    cfg = {"mountns": True, "mask": RUNC_MASKS, "caps": DOCKER_CAPS}
    env = {"RBUILD_ROOT": ctroot_dirs["store"], "XDG_RUNTIME_DIR": ctroot_dirs["run"]}
    res = launch(ctroot_dirs["out"], cfg, ["build", "--log-level", "debug", ctroot_dirs["ctx"]], None, env)
    image = res.stdout.strip().splitlines()[-1]
    assert "share the builder's pid namespace" in res.stderr, res.stderr
    _no_leftover_sleep()
    layout = os.path.join(ctroot_dirs["out"], "layout")
    launch(ctroot_dirs["out"], cfg, ["push", image, f"oci:{layout}"], None, env)
    got = _tree_and_config(layout)
    assert ocitree.diff_trees(want[0], got[0], ("baseline", "container root")) == []
    assert got[1] == want[1]


def test_failing_newuidmap_falls_back_to_one_uid(rb: Runner, rb_single: Runner, busybox: str) -> None:
    """no_new_privs (allowPrivilegeEscalation: false) makes the setuid helpers fail: a one-line notice and
    the single-uid map, not a fatal error; with runc's masked /proc, RUN still works."""
    cf = (
        f"FROM oci:{busybox}\nRUN mkdir /opq && echo y > /opq/old && ln -s /opq/old /link\n"
        "COPY --chown=1000:1000 a.txt /home/app/a.txt\n"
        "RUN (sleep 4242 &) ; rm -rf /opq && mkdir /opq && echo new > /opq/new && rm /bin/vi\n"
    )
    files = {"a.txt": "a\n"}
    want = _baseline(rb_single, cf, files)
    ctx = rb.context({"Containerfile": cf, **files})
    store = os.path.join(rb.mkdir(), "store")
    cfg = {"mountns": True, "mask": RUNC_MASKS, "no_new_privs": True}
    res = launch(rb.base, cfg, ["build", "-q", ctx], rb, {"RBUILD_ROOT": store})
    notices = [ln for ln in res.stderr.splitlines() if "newgidmap failed" in ln]
    assert len(notices) == 1 and "single-uid user namespace" in notices[0], res.stderr
    _no_leftover_sleep()
    layout = os.path.join(rb.mkdir(), "layout")
    launch(rb.base, cfg, ["push", res.stdout.strip(), f"oci:{layout}"], rb, {"RBUILD_ROOT": store})
    got = _tree_and_config(layout)
    assert ocitree.diff_trees(want[0], got[0], ("baseline", "no_new_privs")) == []
    assert got[1] == want[1]


def test_blocked_user_namespaces_pull_push_and_refuse_run_up_front(rb: Runner, busybox: str) -> None:
    """Rung 5: a seccomp filter blocks CLONE_NEWUSER. pull, images, push and a RUN-less build work; a
    Containerfile with RUN fails before anything is done, with one line naming the gate and the remedy."""
    store = os.path.join(rb.mkdir(), "store")
    env = {"RBUILD_ROOT": store}
    cfg = {"seccomp": ["userns"]}
    pulled = launch(rb.base, cfg, ["pull", "-q", f"oci:{busybox}"], rb, env).stdout.strip()
    assert (
        "seccomp filter blocks CLONE_NEWUSER" in launch(rb.base, cfg, ["pull", "-q", f"oci:{busybox}"], rb, env).stderr
    )
    listed = launch(rb.base, cfg, ["images"], rb, env).stdout
    assert pulled[7:19] in listed, listed
    layout = os.path.join(rb.mkdir(), "layout")
    launch(rb.base, cfg, ["push", pulled, f"oci:{layout}"], rb, env)
    base_tree, _ = _tree_and_config(busybox)
    assert ocitree.diff_trees(base_tree, _tree_and_config(layout)[0]) == []

    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nENV A=1\nLABEL x=y\nRUN true\n"})
    res = launch(rb.base, cfg, ["build", ctx], rb, env, check=False)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert res.returncode == 125 and len(errors) == 1, res.stderr
    assert ":4: RUN needs a user namespace" in errors[0] and "seccomp" in errors[0] and "remedy" in errors[0]
    assert "STEP" not in res.stderr and "Traceback" not in res.stderr, res.stderr

    cf = f"FROM oci:{busybox}\nENV A=1\nLABEL x=y\n"
    want = _baseline(rb, cf, {})
    ctx = rb.context({"Containerfile": cf})
    image = launch(rb.base, cfg, ["build", "-q", ctx], rb, env).stdout.strip()
    out = os.path.join(rb.mkdir(), "built")
    launch(rb.base, cfg, ["push", image, f"oci:{out}"], rb, env)
    got = _tree_and_config(out)
    assert ocitree.diff_trees(want[0], got[0]) == [] and got[1] == want[1]


def test_mount_denied_names_the_step_and_the_remedy(rb: Runner, busybox: str) -> None:
    """User namespaces allowed, mount(2) denied: one line naming what failed and the remedy, no raw
    PermissionError."""
    store = os.path.join(rb.mkdir(), "store")
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN true\n"})
    res = launch(rb.base, {"seccomp": ["mount"]}, ["build", ctx], rb, {"RBUILD_ROOT": store}, check=False)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert res.returncode == 125 and len(errors) == 1, res.stderr
    assert "mount" in errors[0] and "PermissionError" not in errors[0] and "allow mount" in errors[0], errors


def test_nested_in_rbuild_unshare_needs_no_settings(rb: Runner, busybox: str) -> None:
    """uid 0 of `rbuild unshare` is not real root: it maps a namespace itself, shares the outer store (the
    same files under the same host ids), and keeps its runtime dir in that store, not in /tmp/rbuild-0."""
    cf = FULL.format(busybox=busybox)
    files = {"a.txt": "a\n"}
    want = _baseline(rb, cf, files)
    ctx = rb.context({"Containerfile": cf, **files})
    out = rb.mkdir()
    script = f'unset XDG_RUNTIME_DIR; id=$(rbuild build -q --no-cache {ctx}) && rbuild push "$id" oci:{out}/layout'
    res = rb.run("unshare", "sh", "-c", script, check=False)
    assert res.returncode == 0, res.stderr
    assert os.path.isdir(os.path.join(rb.root, "run")), os.listdir(rb.root)
    got = _tree_and_config(os.path.join(out, "layout"))
    assert ocitree.diff_trees(want[0], got[0], ("baseline", "nested")) == []
    assert got[1] == want[1]


CHROOT_RUNS = r"""
import json, sys
from rootless.sandbox import spec

root, scratch = sys.argv[1], sys.argv[2]


def run(cmd, uid=0, gid=0):
    return spec.run(root, spec.RunSpec(["/bin/sh", "-c", cmd], {}, "/", uid, gid, [gid], namespaces=False), scratch)


print(json.dumps({
    "chown": run("echo x > /owned && chown 1000:1000 /owned && echo y > /dev/null && test -c /dev/urandom"),
    "user": run("id -u > /tmp/uid && id -g >> /tmp/uid", 1000, 1000),
    "no-proc": run("test ! -e /proc/self/status"),
    "chroot-again": run("mkdir -p /x && chroot /x /bin/true"),
    "bg": run("(sleep 4242 &) ; true"),
}))
"""


def test_none_privileged_run_is_chrooted_without_mounts(busybox: str, tmp_path: object) -> None:
    """Rung 4 (container root, docker's caps, user namespaces blocked): RUN without any mount -- chroot into
    the step's tree with mknod'd devices, real chown, the user's ids, no way to chroot out again, nothing
    left behind in the tree or running."""
    import tarfile

    base = str(tmp_path)
    tree, scratch = os.path.join(base, "tree"), os.path.join(base, "scratch")
    os.makedirs(scratch)
    with tarfile.open(fileobj=__import__("io").BytesIO(ocitree.load(busybox).layers[0])) as tf:
        tf.extractall(tree, numeric_owner=True)  # noqa: S202 - our own busybox layer
    before = sorted(os.listdir(tree))
    script = os.path.join(base, "runs.py")
    with open(script, "w") as f:
        f.write(CHROOT_RUNS)
    cfg = {"seccomp": ["userns"], "caps": DOCKER_CAPS}
    res = launch(base, cfg, ["-I", script, tree, scratch], None, {"PYTHONPATH": ""}, python=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["chown"] == 0 and got["user"] == 0 and got["no-proc"] == 0 and got["bg"] == 0, (got, res.stderr)
    assert got["chroot-again"] != 0, got
    st = os.lstat(os.path.join(tree, "owned"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    with open(os.path.join(tree, "tmp", "uid")) as f:
        assert f.read().split() == ["1000", "1000"]
    assert sorted(os.listdir(tree)) == sorted([*before, "owned", "x"])  # no /dev, /proc or /etc stubs left
    _no_leftover_sleep()


def test_store_on_overlayfs_falls_back_or_names_the_filesystem_and_the_remedy(rb: Runner, busybox: str) -> None:
    """The store on overlayfs (any container's root): kernel overlay refuses it as upper. The automatic
    choice builds on the copy rung; a forced overlay is one error line naming the filesystem and the remedy."""
    base = rb.mkdir()
    dirs = {k: os.path.join(base, k) for k in ("l", "u", "w", "m")}
    for d in dirs.values():
        os.mkdir(d)
    opts = f"lowerdir={dirs['l']},upperdir={dirs['u']},workdir={dirs['w']}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, dirs["m"]], check=True)
    try:
        os.chown(dirs["m"], rb.uid, rb.gid)
        ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nCOPY Containerfile /c\n"})
        auto = rb.run("build", ctx, root=os.path.join(dirs["m"], "store"), check=False)
        forced = rb.run("build", "--storage-driver", "overlay", ctx, root=os.path.join(dirs["m"], "s2"), check=False)
    finally:
        subprocess.run(["umount", dirs["m"]], check=True)
    assert auto.returncode == 0, auto.stderr
    errors = [ln for ln in forced.stderr.splitlines() if ln.startswith("Error:")]
    assert forced.returncode == 125 and len(errors) == 1, forced.stderr
    assert "(filesystem type overlay)" in errors[0] and "--root" in errors[0], errors


def _copy_driver() -> None:
    """The mount-free rungs build through the copy rootfs driver, which another change brings."""
    import importlib.util

    if importlib.util.find_spec("rootless.rootfs.copy") is None:
        pytest.skip("the copy rootfs driver (rootless/rootfs/copy.py) is not in this tree yet: rungs 4 and 5 need it")


MULTI = """FROM oci:{busybox} AS stage
RUN mkdir -p /out/sub && echo s > /out/sub/f && ln -s sub/f /out/link && chown -R 1000:1000 /out
FROM oci:{busybox}
COPY --chown=1000:1000 a.txt /home/app/a.txt
COPY --from=stage /out /copied/
ADD a.txt /added
ENV A=1
LABEL x=y
"""


def test_container_root_with_user_namespaces_blocked_builds_with_real_chown(
    rb: Runner, busybox: str, ctroot_dirs: dict[str, str]
) -> None:
    """Rung 4: root of a container (docker's caps), CLONE_NEWUSER blocked, masked /proc: no mounts, real
    chown, RUN chroot'ed; the image equals the baseline."""
    _copy_driver()
    cf = FULL.format(busybox=busybox)
    files = {"a.txt": "a\n"}
    want = _baseline(rb, cf, files)
    for name, text in {"Containerfile": cf, **files}.items():
        with open(os.path.join(ctroot_dirs["ctx"], name), "w") as f:
            f.write(text)
    cfg = {"mountns": True, "mask": RUNC_MASKS, "caps": DOCKER_CAPS, "seccomp": ["userns"]}
    env = {"RBUILD_ROOT": ctroot_dirs["store"], "XDG_RUNTIME_DIR": ctroot_dirs["run"]}
    image = launch(ctroot_dirs["out"], cfg, ["build", "-q", ctroot_dirs["ctx"]], None, env).stdout.strip()
    _no_leftover_sleep()
    layout = os.path.join(ctroot_dirs["out"], "layout")
    launch(ctroot_dirs["out"], cfg, ["push", image, f"oci:{layout}"], None, env)
    got = _tree_and_config(layout)
    assert ocitree.diff_trees(want[0], got[0], ("baseline", "rung 4")) == []
    assert got[1] == want[1]


def test_blocked_user_namespaces_copy_add_and_copy_from(rb: Runner, busybox: str) -> None:
    """Rung 5: COPY --chown, ADD and multi-stage COPY --from (from a stage without RUN) give
    the baseline's image, owners recorded."""
    _copy_driver()
    cf = (
        f"FROM oci:{busybox} AS stage\nCOPY --chown=1000:1000 a.txt /out/sub/f\n"
        + MULTI.format(busybox=busybox).split("\n", 2)[2]
    )
    files = {"a.txt": "a\n"}
    want = _baseline(rb, cf, files)
    store = os.path.join(rb.mkdir(), "store")
    ctx = rb.context({"Containerfile": cf, **files})
    cfg = {"seccomp": ["userns"]}
    image = launch(rb.base, cfg, ["build", "-q", ctx], rb, {"RBUILD_ROOT": store}).stdout.strip()
    layout = os.path.join(rb.mkdir(), "layout")
    launch(rb.base, cfg, ["push", image, f"oci:{layout}"], rb, {"RBUILD_ROOT": store})
    got = _tree_and_config(layout)
    assert ocitree.diff_trees(want[0], got[0], ("baseline", "rung 5")) == []
    assert got[1] == want[1]
