"""The FUSE rung (issue 11, rung 2; issue 13): rbuild-fuse-overlay as the step's root filesystem.

The same Containerfile built with `--storage-driver fuse` and with kernel overlay gives the same image id:
the helper's upper dir is the layer in overlay's own on-disk format. The automatic choice takes FUSE where
kernel overlay is refused on a store in overlay's format and /dev/fuse opens, and copy where it does not
(a store on overlayfs is in rbuild's xattr format, which FUSE does not build on); `doctor` says so.
/dev/fuse is root-only on this machine: the `dev_fuse` fixture opens it to users for a test and puts the
mode back.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import IS_ROOT, busybox_layer, write_oci_layout
from test_copy_rung import CONTAINERFILE, MAPPED, SDE, _extra_layer

# RUN under a FUSE root: a non-root USER (allow_other), hard links, whiteouts, an opaque directory, xattrs
EXTRA = """RUN mkdir -p /opq && echo 1 > /opq/one && setfattr -n user.k -v v /opq/one 2>/dev/null; true
RUN rm -rf /opq && mkdir /opq && echo 2 > /opq/two && mv /data/hard /data/hard2
"""


@pytest.fixture
def closed_fuse() -> Iterator[None]:
    """/dev/fuse root-only while the test runs (this machine's default); the mode restored."""
    orig = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if not IS_ROOT:
        pytest.skip("changing /dev/fuse's mode needs root")
    os.chmod("/dev/fuse", 0o600)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", orig)


@pytest.fixture(scope="module")
def base(rb: Any) -> str:
    path = os.path.join(os.path.dirname(rb.base), "fuse-rung-base")  # both builder users read it
    write_oci_layout(path, [busybox_layer(), _extra_layer()])
    for dirpath, _, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    return path


def _build(runner: Any, base: str, driver: str | None, root: str | None = None, text: str | None = None) -> Any:
    """Build in a fresh store (or `root`) with `driver` (None: the automatic choice); the image id and the
    store's recorded rootfs driver."""
    root = root or runner.fresh_root()
    if text is None:
        text = CONTAINERFILE.format(base=base, extra=(MAPPED if runner.has_range else "") + EXTRA)
    ctx = runner.context({"Containerfile": text, "files/a.txt": "a\n", "files/dir/b.bin": bytes(range(256)) * 100})
    extra = ("--storage-driver", driver) if driver else ()
    image = runner.build(ctx, *extra, root=root, env={"SOURCE_DATE_EPOCH": SDE})
    with open(os.path.join(root, "store.json")) as f:
        return image, json.load(f)["strategy"]["rootfs"]


def _no_fuse_left(runner: Any) -> None:
    """No helper process of the user is left, and no FUSE mount of it."""
    assert not [p for p in runner.processes() if "rbuild-fuse" in p], runner.processes()
    with open("/proc/self/mountinfo") as f:
        assert "rbuild-fuse-overlay" not in f.read()


def test_fuse_and_overlay_give_the_same_image(rb: Any, base: str, dev_fuse: None) -> None:
    overlay, d1 = _build(rb, base, "overlay")
    fuse, d2 = _build(rb, base, "fuse")
    assert (d1, d2) == ("overlay", "fuse")
    assert fuse == overlay
    _no_fuse_left(rb)


def test_fuse_and_overlay_give_the_same_image_single_uid(rb_single: Any, base: str, dev_fuse: None) -> None:
    overlay, _ = _build(rb_single, base, "overlay")
    fuse, d = _build(rb_single, base, "fuse")
    assert d == "fuse"
    assert fuse == overlay
    _no_fuse_left(rb_single)


def test_forced_fuse_without_dev_fuse_says_why(rb: Any, base: str, closed_fuse: None) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{base}\nRUN echo x > /x\n"})
    res = rb.run("--storage-driver", "fuse", "build", "-q", ctx, root=rb.fresh_root(), check=False)
    assert res.returncode == 125
    assert res.stderr.strip() == (
        "Error: storage driver fuse cannot be used: cannot open /dev/fuse: Permission denied "
        "(chmod 0666 /dev/fuse; containers: --device /dev/fuse)"
    )


@pytest.fixture
def overlay_store(rb: Any) -> Iterator[str]:
    """A directory for the store on an overlayfs mount made by root (as a container's root filesystem)."""
    if not IS_ROOT:
        pytest.skip("mounting an overlayfs for the store needs root")
    d = rb.mkdir()
    for sub in ("lower", "upper", "work", "merged"):
        os.mkdir(os.path.join(d, sub))
    opts = f"lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/work"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, f"{d}/merged"], check=True)
    try:
        os.chown(f"{d}/merged", rb.uid, rb.gid)
        yield f"{d}/merged/store"
    finally:
        subprocess.run(["umount", f"{d}/merged"], check=True)
        subprocess.run(["rm", "-rf", d], check=True)


# no removal: a layer dir on overlayfs cannot hold the 0:0 device that marks one (test_copy_rung says why)
NO_REMOVAL = """FROM oci:{base}
COPY --chown=1000:50 files/ /app/
RUN echo x > /x && chmod 0600 /etc/group && mkdir -p /d/e && ln /x /d/e/x && chown -R 7:8 /d
USER 1000:1000
RUN echo mine > /tmp/mine
"""


def test_overlay_store_takes_copy_in_the_xattr_format(rb: Any, base: str, overlay_store: str, dev_fuse: None) -> None:
    """A store on overlayfs cannot hold kernel overlay's whiteouts, which the FUSE helper's upper dir is made
    of: its layers are in rbuild's xattr format, which only the copy rung builds on -- even with /dev/fuse
    open -- and a removal works there (test_ladder compares the whole image)."""
    text = NO_REMOVAL.format(base=base)
    image, driver = _build(rb, base, None, root=overlay_store, text=text)
    assert driver == "copy"
    reference, _ = _build(rb, base, "overlay", text=text)  # kernel overlay on a local store
    assert image == reference
    doc = json.loads(rb.run("doctor", "--json", root=overlay_store, check=False).stdout)
    assert doc["rung"] == 3, doc
    assert any(s.startswith("rung 2 (") and "xattr format" in s for s in doc["skipped"]), doc
    forced = rb.context({"Containerfile": f"FROM oci:{base}\nRUN true\n"})
    res = rb.run("build", "-q", "--storage-driver", "fuse", forced, root=overlay_store, check=False)
    assert res.returncode == 125 and "xattr format" in res.stderr, res.stderr
    removal = rb.context({"Containerfile": f"FROM oci:{base}\nRUN rm /etc/group\n"})
    rb.run("build", "-q", removal, root=overlay_store)
    _no_fuse_left(rb)


def test_overlay_store_without_dev_fuse_takes_copy(rb: Any, base: str, overlay_store: str, closed_fuse: None) -> None:
    _, driver = _build(rb, base, None, root=overlay_store, text=NO_REMOVAL.format(base=base))
    assert driver == "copy"
    doc = json.loads(rb.run("doctor", "--json", root=overlay_store).stdout)
    assert doc["rung"] == 3, doc
    assert any(s.startswith("rung 2 (") and "/dev/fuse: Permission denied" in s for s in doc["skipped"]), doc


def test_killed_build_leaves_no_helper_and_no_mount(rb: Any, base: str, dev_fuse: None) -> None:
    """SIGKILL of rbuild while a RUN runs on the FUSE root: the helper ends with it (PR_SET_PDEATHSIG), so
    no process and no mount are left, and the next build works."""
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": f"FROM oci:{base}\nRUN touch /inside && sleep 600\n"})
    proc = subprocess.Popen(
        rb._prefix() + [rb.bin, "build", "-q", "--storage-driver", "fuse", ctx],
        env={**rb._env(None), "RBUILD_ROOT": root},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not [p for p in rb.processes() if p.endswith(" sleep")]:
            assert time.monotonic() < deadline, "the RUN never started"
            assert proc.poll() is None, "the build ended early"
            time.sleep(0.1)
        assert [p for p in rb.processes() if "rbuild-fuse" in p], "the build does not run on the FUSE helper"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while [p for p in rb.processes() if "rbuild-fuse" in p or p.endswith(" sleep")]:
            assert time.monotonic() < deadline, rb.processes()
            time.sleep(0.1)
        _no_fuse_left(rb)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    ok = rb.context({"Containerfile": f"FROM oci:{base}\nRUN echo ok > /ok\n"})
    assert rb.build(ok, "--storage-driver", "fuse", root=root).startswith("sha256:")


MULTI_STAGE = """FROM oci:{base} AS first
RUN mkdir -p /out/d && echo one > /out/d/one && ln -s one /out/d/ln && rm /etc/group
RUN echo two > /out/two && rm /out/d/one
FROM oci:{base}
COPY --from=first /out/ /copied/
RUN --mount=type=bind,from=first,source=/out,target=/mnt cat /mnt/two > /from-mount && ls /mnt/d > /listing
"""


def test_multi_stage_views_same_as_overlay(rb: Any, base: str, dev_fuse: None) -> None:
    """COPY --from and RUN --mount=from read a stage through the driver's read-only view (a FUSE mount)."""
    text = MULTI_STAGE.format(base=base)
    overlay, _ = _build(rb, base, "overlay", text=text)
    fuse, driver = _build(rb, base, "fuse", text=text)
    assert (fuse, driver) == (overlay, "fuse")
    _no_fuse_left(rb)
