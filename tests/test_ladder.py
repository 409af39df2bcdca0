"""The strategy ladder (issue 11): the copy rung with the store on overlayfs, the store's layer format.

A container's root filesystem is an overlayfs: kernel overlay cannot use it as an upper dir, and it
refuses the 0:0 character device that marks a whiteout in overlay's layer format (overlayfs will not
create one, which would be a whiteout of its own). Such a store takes rbuild's xattr layer format
(`rootless.layer.format.XATTR`) when it is made and builds on the copy rung. The store is on a real
overlayfs mount (tests/envsim.py), the build runs as an unprivileged user; its image (flattened tree with
owners and modes, config) must equal the same user's build on a plain store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import ocitree  # noqa: E402
from conftest import IS_ROOT, Runner  # noqa: E402
from envsim import EnvSim, EnvSpec  # noqa: E402

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="mounting an overlayfs for the store needs root")

# RUN chown, COPY --chown, a non-root USER's RUN, a whiteout of a base file, a symlink, an opaque directory
CONTAINERFILE = """FROM oci:{busybox}
RUN mkdir -p /data/sub /opq && echo x > /data/sub/f && echo y > /opq/old && chown -R 1000:1000 /data \\
    && ln -s /data/sub/f /link
COPY --chown=1000:1000 a.txt /home/app/a.txt
USER app
RUN echo hi > /home/app/b.txt && id -u > /home/app/uid
USER root
RUN rm -rf /opq && mkdir /opq && echo new > /opq/new && rm /home/app/a.txt && rm /etc/group
LABEL rung=copy
"""


def _image(user: Runner, run: Any, store: str, ctx: str, *extra: str) -> tuple[ocitree.Tree, dict[str, Any]]:
    """Build ctx into `store` and push it to a layout through `run` (argv, env) -> CompletedProcess."""
    env = user._env({"RBUILD_ROOT": store})
    res = run(["rbuild", "build", "-q", *extra, ctx], env)
    assert res.returncode == 0, res.stderr
    layout = os.path.join(user.mkdir(), "layout")
    res = run(["rbuild", "push", "-q", res.stdout.strip(), f"oci:{layout}"], env)
    assert res.returncode == 0, res.stderr
    img = ocitree.load(layout)
    return ocitree.flatten(img.layers), ocitree.compared_config(img)


def _plain(user: Runner, store: str, ctx: str) -> tuple[ocitree.Tree, dict[str, Any]]:
    def run(argv: list[str], env: dict[str, str]) -> Any:
        return user.run(*argv[1:], env=env, check=False)

    return _image(user, run, store, ctx)


@pytest.mark.parametrize("who", ["rb", "rb_single"])
def test_store_on_overlayfs_builds_the_baseline_image(who: str, request: pytest.FixtureRequest, busybox: str) -> None:
    user: Runner = request.getfixturevalue(who)
    ctx = user.context({"Containerfile": CONTAINERFILE.format(busybox=busybox), "a.txt": "a\n"})
    want = _plain(user, user.fresh_root(), ctx)
    with EnvSim(EnvSpec(store_on_overlay=True)) as env:
        env.own_overlay(user)
        store = os.path.join(env.overlay_dir, "store")

        def run(argv: list[str], e: dict[str, str]) -> Any:
            return env.run([user.bin, *argv[1:]], user=user, env=e)

        got = _image(user, run, store, ctx)
        meta = json.loads(env.run(["cat", f"{store}/store.json"], user=user).stdout)
    assert ocitree.diff_trees(want[0], got[0], ("plain store", "store on overlayfs")) == []
    assert got[1] == want[1]
    assert meta["layer_format"] == "rbuild-xattr"
    assert (meta["strategy"]["rootfs"], meta["strategy"]["layer_format"]) == ("copy", "rbuild-xattr")


def _strategy(root: str) -> dict[str, str]:
    with open(os.path.join(root, "store.json")) as f:
        strategy: dict[str, str] = json.load(f)["strategy"]
    return strategy


def _error(res: Any) -> str:
    assert res.returncode == 125, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def test_isolation_chosen_by_the_user(rb: Runner, rb_single: Runner, busybox: str) -> None:
    """--isolation before or after the subcommand, or RBUILD_ISOLATION: the rung is the one named; a rung
    that cannot work is one error saying why, never another rung."""
    run_cf = f"FROM oci:{busybox}\nRUN echo hi > /hi && chown 0:0 /hi\n"
    ctx = rb.context({"Containerfile": run_cf})
    for argv, env, want in (
        (["--isolation", "userns", "build"], None, "userns"),
        (["build", "--isolation=single"], None, "userns-single"),
        (["build"], {"RBUILD_ISOLATION": "single"}, "userns-single"),
        (["build", "--isolation", "auto"], {"RBUILD_ISOLATION": "none"}, "userns"),  # the flag wins
    ):
        root = rb.fresh_root()
        rb.run(*argv, "-q", ctx, root=root, env=env)
        assert _strategy(root)["isolation"] == want, (argv, env)
    # none: no user namespace although one could be made; RUN is refused up front, the rest builds
    root = rb.fresh_root()
    err = _error(rb.run("--isolation", "none", "build", "-q", ctx, root=root, check=False))
    assert err.startswith(f"Error: {os.path.basename(ctx)}/Containerfile:2: RUN needs a user namespace"), err
    plain = rb.context({"Containerfile": f"FROM oci:{busybox}\nCOPY Containerfile /c\nLABEL a=b\n"})
    rb.run("build", "-q", "--isolation", "none", plain, root=root)
    assert _strategy(root)["isolation"] == "none"
    # rungs that cannot work for this user
    cases = (
        (
            rb,
            "privileged",
            "Error: --isolation privileged: building without a user namespace with real chown needs uid 0",
        ),
        (rb, "chroot", "Error: --isolation privileged: building without a user namespace with real chown needs uid 0"),
        (rb, "host", f"Error: --isolation host: this is not real root (uid {rb.uid}"),
        (rb_single, "userns", f"Error: --isolation userns: no range for uid {rb_single.uid} in /etc/subuid"),
        (
            rb,
            "oci",
            "Error: unknown isolation 'oci': choose one of auto, host, userns, single, privileged, none, chroot",
        ),
    )
    for user, name, start in cases:
        root = user.fresh_root()
        own = plain if user is rb else user.context({"Containerfile": f"FROM oci:{busybox}\nLABEL a=b\n"})
        err = _error(user.run("build", "-q", "--isolation", name, own, root=root, check=False))
        assert err.startswith(start), (name, err)
        assert not os.path.exists(os.path.join(root, "store.json")), name


def test_forced_isolation_never_falls_back(rb: Runner, busybox: str) -> None:
    """Where newuidmap cannot work (no_new_privs) or user namespaces are blocked (seccomp), a forced rung
    that needs them is an error naming the cause; unforced, the build falls back with a notice."""
    plain = rb.context({"Containerfile": f"FROM oci:{busybox}\nLABEL a=b\n"})
    for spec, name, want in (
        (EnvSpec(no_new_privs=True), "userns", "Error: --isolation userns: newgidmap failed ("),
        (EnvSpec(seccomp_no_userns=True), "userns", "Error: --isolation userns: no user namespace can be created"),
        (EnvSpec(seccomp_no_userns=True), "single", "Error: --isolation single: no user namespace can be created"),
    ):
        with EnvSim(spec) as env:
            e = rb._env({"RBUILD_ROOT": rb.fresh_root()})
            res = env.run([rb.bin, "build", "-q", "--isolation", name, plain], user=rb, env=e)
            err = _error(res)
            assert err.startswith(want), (spec, err)
            assert env.run([rb.bin, "build", "-q", plain], user=rb, env=e).returncode == 0


def test_a_store_moves_between_rungs_with_its_layer_format(rb: Runner, busybox: str) -> None:
    """The store records the rung that last wrote it. Overlay and copy share the overlay layer format, so
    one store moves between them; a store in rbuild's xattr format (made on an overlayfs, then copied to a
    plain filesystem, as a CI cache restored elsewhere) builds on copy, and a forced overlay is one error
    naming the format, the rung that made it and the remedy."""
    files = {"a.txt": "a\n"}
    ctxs = [
        rb.context(
            {"Containerfile": f"FROM oci:{busybox}\nRUN rm /etc/group && mkdir /d && echo {i} > /d/f\n", **files}
        )
        for i in range(3)
    ]
    sde = {"SOURCE_DATE_EPOCH": "1700000000"}  # the same image from every rung, to the digest
    want = [rb.build(ctx, root=rb.fresh_root(), env=sde) for ctx in ctxs]
    root = rb.fresh_root()
    for ctx, driver, image in zip(ctxs, ("overlay", "copy", "overlay"), want, strict=True):
        assert rb.build(ctx, "--storage-driver", driver, root=root, env=sde) == image
        assert (_strategy(root)["rootfs"], _strategy(root)["layer_format"]) == (driver, "overlay-userxattr")
    moved = os.path.join(rb.mkdir(), "store")
    with EnvSim(EnvSpec(store_on_overlay=True)) as env:
        env.own_overlay(rb)
        e = rb._env({"RBUILD_ROOT": os.path.join(env.overlay_dir, "store"), **sde})
        res = env.run([rb.bin, "build", "-q", ctxs[0]], user=rb, env=e)
        assert res.returncode == 0 and res.stdout.strip() == want[0], res.stderr
        subprocess.run(["cp", "-a", os.path.join(env.base, "upper", "store"), moved], check=True)
    err = _error(rb.run("build", "-q", "--storage-driver", "overlay", ctxs[1], root=moved, env=sde, check=False))
    assert err == (
        f"Error: storage driver overlay cannot be used: the store {moved} holds layers in the rbuild-xattr format "
        "(made on a filesystem that refuses kernel overlay's whiteouts, last written by the userns + copy rung), "
        "which the overlay driver cannot build on: use --storage-driver copy with this store, or give the build "
        "a new store with --root"
    )
    assert rb.build(ctxs[1], root=moved, env=sde) == want[1]
    assert _strategy(moved)["rootfs"] == "copy"


def _build_rung(strategy: dict[str, str]) -> int:
    """The rung (env/probe.py's RUNGS) of a recorded strategy."""
    if strategy["isolation"] in ("none", "none-privileged"):
        return 5 if strategy["isolation"] == "none" else 4
    return {"overlay": 1, "fuse": 2, "copy": 3}[strategy["rootfs"]]


@pytest.fixture
def fuse_open() -> Any:
    """/dev/fuse usable by every user while the test runs (it is 0600 on this machine), then restored."""
    mode = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@pytest.mark.parametrize(
    "spec, fuse, want",
    [
        (EnvSpec(), False, 1),
        (EnvSpec(store_on_overlay=True), False, 3),
        (EnvSpec(seccomp_no_userns=True), False, 5),
        (EnvSpec(store_on_overlay=True, masked_proc=True), True, None),  # FUSE usable: 2 once the driver builds
    ],
)
def test_doctor_rung_is_the_rung_the_build_uses(
    rb: Runner, busybox: str, request: pytest.FixtureRequest, spec: EnvSpec, fuse: bool, want: int | None
) -> None:
    """`rbuild doctor --json`'s rung is the one the next build takes: builds take the probe's answer."""
    if fuse:
        request.getfixturevalue("fuse_open")
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nCOPY Containerfile /c\n"})
    with EnvSim(spec) as env:
        if spec.store_on_overlay:
            env.own_overlay(rb)
            root = os.path.join(env.overlay_dir, "store")
        else:
            root = rb.fresh_root()
        e = rb._env({"RBUILD_ROOT": root})
        for _ in range(2):  # before the store exists, and after
            doctor = env.run([rb.bin, "doctor", "--json"], user=rb, env=e)
            rung = json.loads(doctor.stdout)["rung"]
            res = env.run([rb.bin, "build", "-q", ctx], user=rb, env=e)
            assert res.returncode == 0, res.stderr
            strategy = json.loads(env.run(["cat", f"{root}/store.json"], user=rb).stdout)["strategy"]
            assert rung == _build_rung(strategy), (doctor.stdout, strategy)
            if want is not None:
                assert rung == want


def test_the_probe_skips_overlay_for_a_store_in_the_xattr_format() -> None:
    """A store in rbuild's xattr format is never given to kernel overlay (or FUSE), however well they mount."""
    from rootless.env.probe import Check, Probe, choose

    names = ("storage", "user_namespace", "mount", "overlay", "proc", "fuse", "capabilities")
    probe = Probe(tuple(Check(n, True, "works") for n in names), False, True, False, True)
    assert choose(probe, "overlay-userxattr").rung == 1
    c = choose(probe, "rbuild-xattr")
    assert c.rung == 3 and "the store's layers are in the rbuild-xattr format" in c.skipped[0]
