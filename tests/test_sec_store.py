"""The store survives anything: `rbuild check [--repair]`, leftovers of killed builds swept (staging, mount
points), a runtime directory another user took first, SIGHUP, stores made under another id mapping, and
`Error:` always meaning a non-zero exit. Every build runs as the unprivileged test users."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from conftest import Runner, default_signals, end_session


def cf(busybox: str, body: str) -> str:
    return f"FROM oci:{busybox}\n{body}"


def _config(root: str, image_id: str) -> dict:
    with open(os.path.join(root, "blobs", "sha256", image_id[7:])) as f:
        return json.load(f)


def _chain(root: str, image_id: str, index: int) -> str:
    """The chain id of the image's layer `index`: the store keys unpacked layers by it (chains/HEX)."""
    chain = ""
    for d in _config(root, image_id)["rootfs"]["diff_ids"][: index + 1]:
        chain = d if not chain else "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


def _runtime_of(rb: Runner, root: str) -> str:
    """The store's directory for mount points in the default runtime dir (Store.runtime_path)."""
    return os.path.join(f"/tmp/rbuild-{rb.uid}", hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:16])


def _check(rb: Runner, root: str, *extra: str) -> subprocess.CompletedProcess:
    return rb.run("check", *extra, root=root, check=False)


def _no_processes(rb: Runner) -> bool:
    deadline = time.monotonic() + 15
    while rb.processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _start_until(rb: Runner, argv: list[str], root: str, word: bytes) -> subprocess.Popen:
    """Start rbuild in its own session and wait until its stderr shows `word`."""
    proc = subprocess.Popen(
        rb._prefix() + [rb.bin, *argv],
        env=rb._env({"RBUILD_ROOT": root}),
        cwd=rb.base,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=default_signals,
    )
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.monotonic() + 60
    while word not in seen and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        seen += proc.stderr.read() or b""
    if word not in seen:
        end_session(proc)
        raise AssertionError(f"{word!r} never came: {seen!r}")
    return proc


# -------------------------------------------------------------------------------------------------------
# rbuild check


def test_check_finds_each_kind_of_damage_and_repair_removes_it(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    img_a = rb.build(rb.context({"Containerfile": cf(busybox, "RUN echo a > /a\n")}), "-t", "dmg-a", root=root)
    img_b = rb.build(rb.context({"Containerfile": cf(busybox, "RUN echo b > /b\n")}), "-t", "dmg-b", root=root)
    img_c = rb.build(rb.context({"Containerfile": cf(busybox, "LABEL c=1\n")}), "-t", "dmg-c", root=root)
    out = rb.mkdir()
    rb.run("push", "dmg-b", f"oci:{out}/b", root=root)  # makes and keeps a compressed blob of b's layer
    res = _check(rb, root)
    assert (res.returncode, res.stdout) == (0, ""), res.stdout + res.stderr

    layer_a, diff_a = _chain(root, img_a, 1), _config(root, img_a)["rootfs"]["diff_ids"][1]
    with open(os.path.join(root, "chains", layer_a[7:], "a"), "w") as f:
        f.write("changed behind rbuild's back\n")
    layer_b = _chain(root, img_b, 1)
    with open(os.path.join(root, "chains", layer_b[7:] + ".json")) as f:
        pushed = [b["digest"] for b in json.load(f)["blobs"]]
    assert len(pushed) == 1
    with open(os.path.join(root, "blobs", "sha256", pushed[0][7:]), "r+b") as f:
        f.write(b"garbage")
    os.unlink(os.path.join(root, "blobs", "sha256", img_c[7:]))
    dangling = "f" * 64
    with open(os.path.join(root, "cache", dangling + ".json"), "w") as f:
        json.dump({"config": {}, "layers": ["sha256:" + "0" * 64]}, f)

    res = _check(rb, root)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    expected = {
        f"blob {pushed[0][7:]}": "corrupt",
        f"layer {layer_a}": "no longer matches its diff_id",
        f"image {img_a}": f"its layer {diff_a} is missing or broken",
        f"image {img_c}": "config blob",
        f"cache {dangling}": "missing or broken",
    }
    for prefix, why in expected.items():
        assert any(ln.startswith(prefix + ":") and why in ln for ln in lines), (prefix, lines)
    # a's RUN step is cached under its layer: that entry is dangling too; nothing else is reported
    assert len(lines) == len(expected) + 1 and sum(ln.startswith("cache ") for ln in lines) == 2, lines
    assert "Error" not in res.stderr and "--repair" in res.stderr

    res = _check(rb, root, "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    removed = res.stdout.splitlines()
    assert len(removed) == len(lines) and all(ln.startswith("removed ") for ln in removed), removed
    res = _check(rb, root)
    assert (res.returncode, res.stdout) == (0, ""), res.stdout + res.stderr

    names = {n for i in json.loads(rb.run("images", "--format", "json", root=root).stdout) for n in i["Names"]}
    assert "localhost/dmg-b:latest" in names and not {"localhost/dmg-a:latest", "localhost/dmg-c:latest"} & names
    # what was removed is made again: a's RUN runs again, b's compressed layer is made again
    rb.build(rb.context({"Containerfile": cf(busybox, "RUN echo a > /a\n")}), root=root)
    rb.run("push", "dmg-b", f"oci:{out}/b2", root=root)
    assert _check(rb, root).returncode == 0


def test_check_reunpacks_pulled_layers(rb: Runner, busybox: str) -> None:
    # busybox's layer was not written by rbuild: its directory is compared with its blob unpacked again
    root = rb.fresh_root()
    image = rb.build(rb.context({"Containerfile": cf(busybox, "ENV X=1\n")}), "-t", "pulled", root=root)
    base = _config(root, image)["rootfs"]["diff_ids"][0]
    with open(os.path.join(root, "chains", base[7:] + ".json")) as f:
        assert json.load(f)["origin"] == "blob"
    assert _check(rb, root).returncode == 0
    with open(os.path.join(root, "chains", base[7:], "etc", "passwd"), "a") as f:
        f.write("intruder:x:0:0::/:/bin/sh\n")
    res = _check(rb, root)
    assert res.returncode == 1
    assert f"layer {base}: its directory differs from its original blob's content" in res.stdout.splitlines()
    assert _check(rb, root, "--repair").returncode == 0
    assert not os.path.exists(os.path.join(root, "chains", base[7:]))
    rb.build(rb.context({"Containerfile": cf(busybox, "ENV X=1\n")}), root=root)  # pulled and unpacked again
    assert _check(rb, root).returncode == 0


def test_check_sets_an_unreadable_image_index_aside(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    rb.build(rb.context({"Containerfile": cf(busybox, "ENV X=1\n")}), root=root)
    with open(os.path.join(root, "images.json"), "w") as f:
        f.write('{"images": [')
    res = _check(rb, root)
    assert res.returncode == 1 and res.stdout.startswith("index images.json: cannot read"), res.stdout
    res = _check(rb, root, "--repair")
    assert res.returncode == 0 and res.stdout.startswith("moved images.json to "), res.stdout + res.stderr
    with open(os.path.join(root, "images.json.corrupt")) as f:
        assert f.read() == '{"images": ['  # kept for recovery by hand
    assert _check(rb, root).returncode == 0
    rb.build(rb.context({"Containerfile": cf(busybox, "ENV X=1\n")}), root=root)


def test_check_sweeps_leftovers_of_killed_processes(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    rb.build(rb.context({"Containerfile": cf(busybox, "RUN true\n")}), root=root)
    runtime = _runtime_of(rb, root)
    assert os.path.isdir(runtime)  # the build made it (and it is rb's)
    dead = [os.path.join(root, "tmp", "step-dead"), os.path.join(runtime, "mnt-dead")]
    for d in dead:
        os.makedirs(os.path.join(d, "upper"))
        open(os.path.join(d, ".lock"), "w").close()
    # killed before its lock was made, or while removing itself: no process uses the store, so dead too
    dead += [os.path.join(root, "tmp", "step-lockless"), os.path.join(runtime, "mnt-lockless")]
    for d in dead[2:]:
        os.makedirs(os.path.join(d, "merged"))
    files = [
        os.path.join(root, "blobs", "sha256", ".tmp-dead"),
        os.path.join(root, "blobs", ".partial-dead"),
        os.path.join(root, "cache", ".tmp-dead"),
        os.path.join(root, ".tmp-dead"),
    ]
    for path in files:
        open(path, "w").close()
    cut = os.path.join(root, "chains", "e" * 64)  # a layer directory whose .json was never written
    os.makedirs(os.path.join(cut, "etc"))
    for path in dead + files + [cut]:
        if os.path.isdir(path):
            rb.own(path)
        else:
            os.chown(path, rb.uid, rb.gid)
    res = _check(rb, root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(res.stdout.splitlines()) == sorted(
        f"removed leftover of a killed process: {p}" for p in dead + files + [cut]
    )
    assert [p for p in dead + files + [cut] if os.path.lexists(p)] == []
    assert os.path.isdir(runtime)


def test_check_leaves_a_running_build_alone(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": cf(busybox, "RUN echo started >&2; sleep 2; echo done > /done\n")})
    proc = _start_until(rb, ["build", ctx], root, b"started")
    try:
        res = _check(rb, root)
        assert (res.returncode, res.stdout) == (0, ""), res.stdout + res.stderr
        assert _check(rb, root, "--repair").returncode == 125  # it needs the store to itself: refused, not waited
        out, err = proc.communicate(timeout=60)
    finally:
        end_session(proc)
    assert proc.returncode == 0, err
    assert _check(rb, root).returncode == 0


# -------------------------------------------------------------------------------------------------------
# leftovers of killed builds; SIGHUP


def test_killed_builds_mount_point_dirs_are_swept(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": cf(busybox, "RUN echo started >&2; sleep 60\n")})
    proc = _start_until(rb, ["build", ctx], root, b"started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _no_processes(rb)
    runtime = _runtime_of(rb, root)
    assert [n for n in os.listdir(runtime) if n.startswith("mnt-")]  # what the killed build left
    rb.build(rb.context({"Containerfile": cf(busybox, "ENV X=1\n")}), root=root)
    assert os.listdir(runtime) == [] and os.listdir(os.path.join(root, "tmp")) == []


def test_sighup_ends_a_build_cleanly(rb: Runner, busybox: str) -> None:
    # a closed terminal hangs up the whole foreground process group
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": cf(busybox, "RUN echo started >&2; sleep 60\n")})
    proc = _start_until(rb, ["build", ctx], root, b"started")
    os.killpg(proc.pid, signal.SIGHUP)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        end_session(proc)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.decode().strip().splitlines()[-1] == "Error: interrupted"
    assert _no_processes(rb)
    assert os.listdir(os.path.join(root, "tmp")) == []
    assert os.listdir(_runtime_of(rb, root)) == []


# -------------------------------------------------------------------------------------------------------
# the runtime directory


@pytest.mark.parametrize("hostile", ["other-owner", "symlink", "open-mode"])
def test_runtime_dir_taken_by_another_user(rb: Runner, rb_single: Runner, busybox: str, hostile: str) -> None:
    default = f"/tmp/rbuild-{rb.uid}"
    lure = rb.mkdir()
    shutil.rmtree(default, ignore_errors=True)  # only empty mount-point directories: no build is running
    try:
        if hostile == "other-owner":
            os.mkdir(default, 0o777)
            os.chmod(default, 0o777)
            os.chown(default, rb_single.uid, rb_single.gid)
        elif hostile == "symlink":
            os.symlink(lure, default)
        else:
            os.mkdir(default)
            os.chmod(default, 0o777)
            os.chown(default, rb.uid, rb.gid)
        root = rb.fresh_root()
        ctx = rb.context({"Containerfile": cf(busybox, "RUN echo hi > /hi\n")})
        first = rb.run("build", "-q", ctx, root=root)
        notices = [ln for ln in first.stderr.splitlines() if default in ln]
        assert len(notices) == 1 and "using /tmp/rbuild-" in notices[0], first.stderr
        fallback = glob.glob(default + "-*")
        assert len(fallback) == 1 and os.stat(fallback[0]).st_uid == rb.uid
        assert os.stat(fallback[0]).st_mode & 0o777 == 0o700
        assert fallback[0] in notices[0]
        rb.run("build", "-q", "--no-cache", ctx, root=root)
        assert glob.glob(default + "-*") == fallback  # found again, not one more each run
        assert os.listdir(lure) == []  # nothing was made where the symlink points
    finally:
        if os.path.islink(default):
            os.unlink(default)
        else:
            shutil.rmtree(default, ignore_errors=True)
        for d in glob.glob(default + "-*"):
            shutil.rmtree(d, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------
# a store made under another id mapping


def test_read_only_commands_work_on_a_store_of_another_mapping(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": cf(busybox, "ENV A=1\n")})
    image = rb.build(ctx, "-t", "foreign", root=root)
    meta_path = os.path.join(root, "store.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["mapping"]["uids"] = [[0, rb.uid, 1]]
    meta["mapping"]["gids"] = [[0, rb.gid, 1]]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    listed = json.loads(rb.run("images", "--format", "json", root=root).stdout)
    assert [i["Id"] for i in listed if "localhost/foreign:latest" in i["Names"]] == [image]
    assert json.loads(rb.run("inspect", "foreign", root=root).stdout)[0]["Id"] == image
    rb.run("tag", "foreign", "foreign:2", root=root)
    assert "localhost/foreign:2" in json.loads(rb.run("inspect", "foreign", root=root).stdout)[0]["RepoTags"]
    for argv in (["build", ctx], ["rmi", "foreign:2"], ["check"]):
        res = rb.run(*argv, root=root, check=False)
        assert res.returncode == 125 and res.stderr.count("Error:") == 1, (argv, res.stderr)
        assert "different user namespace mapping" in res.stderr, (argv, res.stderr)
    assert "localhost/foreign:2" in json.loads(rb.run("inspect", "foreign", root=root).stdout)[0]["RepoTags"]


# -------------------------------------------------------------------------------------------------------
# Error: means a non-zero exit


def test_rmi_errors_exit_non_zero(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    rb.build(rb.context({"Containerfile": cf(busybox, "LABEL x=1\n")}), "-t", "keep", root=root)
    res = rb.run("rmi", "no-such-image", root=root, check=False)
    assert res.returncode == 125 and res.stderr.startswith("Error:"), (res.returncode, res.stderr)

    broken = rb.build(rb.context({"Containerfile": cf(busybox, "LABEL y=1\n")}), "-t", "broken", root=root)
    os.unlink(os.path.join(root, "blobs", "sha256", broken[7:]))  # its config: nobody can tell its layers now
    res = rb.run("rmi", "keep", root=root, check=False)
    assert "Error:" in res.stderr and "check --repair" in res.stderr, res.stderr
    assert res.returncode == 125, (res.returncode, res.stderr)
    assert _check(rb, root, "--repair").returncode == 0
    assert rb.run("rmi", "broken", root=root, check=False).returncode == 125  # repair removed it
