"""Start-up (issues 10 and 15): what a command imports, and the fully cached build answered without
entering the user namespace. Every command runs as the unprivileged `rb` user, in-process through
tests/startup_harness.py, which reports its exit status, the user namespaces it entered (counted around
the real `userns.run_inside`) and the modules it imported."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from conftest import IS_ROOT, Runner

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "startup_harness.py")
REGISTRY_CLIENT = ("rootless.registry.api", "rootless.registry.client", "rootless.registry.http", "requests")
IN_NAMESPACE = {"RBUILD_CONCURRENT_BUILDS": "64"}  # a build under a limit always runs in the namespace
CONTAINERFILE = """FROM localhost/startup-base
ENV GREETING=hello
RUN echo "$GREETING from $(id -u)" > /greeting
COPY hello.txt /hello.txt
RUN cat /greeting /hello.txt > /both
CMD ["cat", "/both"]
"""


def _python(rb: Runner) -> str:
    return os.path.join(os.path.dirname(rb.bin), "python")


def run(
    rb: Runner, root: str, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], str, str]:
    """rbuild ARGS as rb in this store: (the harness's report, stdout, stderr)."""
    report = os.path.join(rb.mkdir(), "report.json")
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    res = rb.sh(
        f"cd / && {_python(rb)} {HARNESS} {report} {quoted}", env={"RBUILD_ROOT": root, **(env or {})}, check=False
    )
    with open(report) as f:
        got: dict[str, Any] = json.load(f)
    if check and got["code"] != 0:
        raise AssertionError(f"rbuild {' '.join(args)} failed ({got['code']}):\n{res.stderr}")
    return got, res.stdout, res.stderr


def store_with_base(rb: Runner, busybox: str) -> str:
    """A fresh store holding busybox under the local name localhost/startup-base."""
    root = rb.fresh_root()
    image = rb.run("pull", "-q", f"oci:{busybox}", root=root).stdout.strip().splitlines()[-1]
    rb.run("tag", image, "localhost/startup-base", root=root)
    return root


def context(rb: Runner, text: str = "hi\n") -> str:
    return rb.context({"Containerfile": CONTAINERFILE, "hello.txt": text})


def events(stderr: str) -> list[dict[str, Any]]:
    """--progress=json's events without what differs from run to run (times, durations)."""
    out = []
    for line in stderr.splitlines():
        e = json.loads(line)
        out.append({k: v for k, v in e.items() if k not in ("time", "seconds")})
    return out


# -------------------------------------------------------------------------------------------------------
# imports


@pytest.mark.parametrize(
    "args",
    [["--version"], ["images"], ["parse", "/"], ["build", "--help"], ["doctor", "--json"]],
    ids=["version", "images", "parse", "build-help", "doctor"],
)
def test_commands_do_not_import_the_registry_client(rb: Runner, args: list[str]) -> None:
    """Issue 10: the registry flags are parsed without the registry client (rootless.registry.api and
    what it pulls in); only a command that talks to a registry imports it."""
    root = rb.fresh_root()
    if args[0] == "parse":
        args = ["parse", context(rb)]
    got, _, _ = run(rb, root, *args, check=False)
    assert got["code"] in (0, 1), got  # doctor: 1 when RUN is not possible here
    loaded = [m for m in REGISTRY_CLIENT if m in got["modules"]]
    assert not loaded, f"rbuild {' '.join(args)} imported {loaded}"


def test_cached_build_imports_neither_registry_client_nor_namespace_code(rb: Runner, busybox: str) -> None:
    """A cached build of a local base: no registry client, no sandbox runner, no layer unpacker."""
    root = store_with_base(rb, busybox)
    ctx = context(rb)
    run(rb, root, "build", "-q", ctx)
    got, _, _ = run(rb, root, "build", "-q", ctx)
    assert got["namespaces"] == 0
    loaded = [m for m in (*REGISTRY_CLIENT, "rootless.sandbox.runinit", "rootless.layer.layers") if m in got["modules"]]
    assert not loaded, f"a cached build imported {loaded}"


def test_registry_client_still_loaded_when_a_registry_is_used(rb: Runner) -> None:
    """The lazy import is not a lost one: login reaches the registry code (and fails there, no registry)."""
    got, _, err = run(rb, rb.fresh_root(), "login", "-u", "x", "-p", "y", "127.0.0.1:9", check=False)
    assert got["code"] == 125 and err.startswith("Error: "), err
    assert "rootless.registry.api" in got["modules"]


# -------------------------------------------------------------------------------------------------------
# the fully cached build without the namespace


def test_cached_build_skips_the_namespace_with_the_same_outcome(rb: Runner, busybox: str) -> None:
    """Issue 15: every step cached -> answered without a user namespace; the image id, stdout and the
    events are those of the same cached build in the namespace (a per-user build limit sends it there)."""
    root = store_with_base(rb, busybox)
    ctx = context(rb)
    first, out1, _ = run(rb, root, "build", "-q", ctx)
    assert first["namespaces"] == 1
    fast, out2, err2 = run(rb, root, "build", "--progress=json", ctx)
    assert fast["namespaces"] == 0
    slow, out3, err3 = run(rb, root, "build", "--progress=json", ctx, env=IN_NAMESPACE)
    assert slow["namespaces"] == 1
    assert out1 == out2 == out3 and out1.startswith("sha256:")
    assert events(err2) == events(err3)
    kinds = [e["type"] for e in events(err2)]
    assert kinds.count("cache-hit") == 5 and kinds[-1] == "build-done"
    plain_fast = run(rb, root, "build", ctx)
    plain_slow = run(rb, root, "build", ctx, env=IN_NAMESPACE)
    assert plain_fast[0]["namespaces"] == 0 and plain_slow[0]["namespaces"] == 1
    strip = [ln for ln in plain_fast[2].splitlines() if not ln.startswith("--> built in")]
    assert strip == [ln for ln in plain_slow[2].splitlines() if not ln.startswith("--> built in")]
    assert plain_fast[1] == plain_slow[1] == out1


def test_a_miss_builds_in_the_namespace(rb: Runner, busybox: str) -> None:
    """A changed COPY source: the attempt finds the miss, drops what it did, and the build runs (RUN
    after the changed step too) in the namespace, with the events of an ordinary build."""
    root = store_with_base(rb, busybox)
    ctx = context(rb)
    before = run(rb, root, "build", "-q", ctx)[1]
    rb.write(os.path.join(ctx, "hello.txt"), "changed\n")
    got, out, err = run(rb, root, "build", "--progress=json", ctx)
    assert got["namespaces"] == 1 and out != before
    kinds = [e["type"] for e in events(err)]
    assert kinds.count("cache-hit") == 2  # ENV and the first RUN; COPY, RUN and CMD are made again
    assert [e.get("cached") for e in events(err) if e["type"] == "step-done"] == [True, True, False, False, False]
    assert os.listdir(os.path.join(root, "tmp")) == []  # the attempt's staging went with it
    again, out2, _ = run(rb, root, "build", "-q", ctx)
    assert again["namespaces"] == 0 and out2 == out
    shown = rb.run("run", "--rm", out.strip(), root=root).stdout
    assert shown == "hello from 0\nchanged\n"


def test_no_cache_and_other_policies_take_the_namespace(rb: Runner, busybox: str) -> None:
    """--no-cache runs every step (in the namespace); the cached build after it takes the fresh results.
    --pull=always and a base from an oci: layout (imported each build) are not answered from the cache."""
    root = store_with_base(rb, busybox)
    ctx = context(rb)
    run(rb, root, "build", "-q", ctx)
    fresh, out, _ = run(rb, root, "build", "-q", "--no-cache", ctx)
    assert fresh["namespaces"] == 1
    cached, out2, _ = run(rb, root, "build", "-q", ctx)
    assert cached["namespaces"] == 0 and out2 == out
    oci_ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nENV A=1\n"})
    run(rb, root, "build", "-q", oci_ctx)
    assert run(rb, root, "build", "-q", oci_ctx)[0]["namespaces"] == 1


def test_strategy_change_and_leftovers_take_the_namespace(rb: Runner, busybox: str) -> None:
    """The store records the rung that wrote it: a build under another one goes through the namespace,
    which records it, and so does the build that returns to the first. A killed process's leftover in the
    store's tmp/ is swept by the namespace's build, after which the cached build skips it again."""
    root = store_with_base(rb, busybox)
    ctx = context(rb)
    image = run(rb, root, "build", "-q", ctx)[1]

    def strategy() -> str:
        with open(os.path.join(root, "store.json")) as f:
            return str(json.load(f)["strategy"]["rootfs"])

    first = strategy()
    other = "copy" if first != "copy" else "overlay"
    moved, out, _ = run(rb, root, "build", "-q", "--storage-driver", other, ctx)
    assert moved["namespaces"] == 1 and out == image and strategy() == other
    back, out, _ = run(rb, root, "build", "-q", ctx)
    assert back["namespaces"] == 1 and out == image and strategy() == first
    assert run(rb, root, "build", "-q", ctx)[0]["namespaces"] == 0

    leftover = os.path.join(root, "tmp", "step-killed")
    os.mkdir(leftover)
    os.chown(leftover, rb.uid, rb.gid)
    old = 1_000_000_000  # older than the sweep's grace period
    os.utime(leftover, (old, old))
    swept, out, _ = run(rb, root, "build", "-q", ctx)
    assert swept["namespaces"] == 1 and out == image and not os.path.exists(leftover)
    assert run(rb, root, "build", "-q", ctx)[0]["namespaces"] == 0


def test_cached_rebuild_leaves_images_json_alone(rb: Runner, busybox: str) -> None:
    """A rebuild of the same image under the same names changes no record: images.json is not rewritten
    (a synced write on every cached build); a new name still is."""
    root = store_with_base(rb, busybox)
    ctx = context(rb)
    image = run(rb, root, "build", "-q", "-t", "startup-app", ctx)[1].strip()
    path = os.path.join(root, "images.json")
    before = os.stat(path)
    assert run(rb, root, "build", "-q", "-t", "startup-app", ctx)[1].strip() == image
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    run(rb, root, "build", "-q", "-t", "startup-app:2", ctx)
    assert os.stat(path).st_ino != before.st_ino
    names = rb.run("images", "--format", "json", root=root).stdout
    assert "localhost/startup-app:2" in names and "localhost/startup-app:latest" in names


@pytest.mark.skipif(not IS_ROOT, reason="touches /etc/subuid, as the test session's user management does")
def test_probe_is_kept_when_other_users_change_the_subordinate_id_files(rb: Runner, busybox: str) -> None:
    """The probe's cache is keyed by this user's own subuid/subgid ranges: another user added to the files
    (their mtime changes) does not make the next build probe again (forked children, a test mount)."""
    root = store_with_base(rb, busybox)
    ctx = context(rb)
    probe_json = f"/tmp/rbuild-{rb.uid}/probe.json"
    for _ in range(3):  # another test session may chmod /dev/fuse meanwhile (a real change): try again
        run(rb, root, "build", "-q", ctx)
        fuse, before = os.stat("/dev/fuse").st_mode, os.stat(probe_json)
        for path in ("/etc/subuid", "/etc/subgid"):
            os.utime(path)  # what adding or removing another user's line does to this user's view
        run(rb, root, "build", "-q", ctx)
        if os.stat("/dev/fuse").st_mode == fuse:
            break
    after = os.stat(probe_json)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
