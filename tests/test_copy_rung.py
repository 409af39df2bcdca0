"""The copy rung (issue 11, rung 3): a user namespace and a copied root, no mounts for the tree.

The same Containerfile built with `--storage-driver copy` and with overlay gives the same image digest:
the copy driver's diff writes the layer in overlay's own on-disk format, so commit is shared. A forced
overlay where it cannot mount (the store on an overlayfs) is an error saying why; the automatic choice
falls back to copy there.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from typing import Any

import ocitree
import pytest
from conftest import busybox_layer, write_oci_layout

SDE = "1700000000"

# every RUN here works under one uid too (no chown, no other USER): the single-uid build uses it alone
CONTAINERFILE = """FROM oci:{base}
ARG SOURCE_DATE_EPOCH
COPY --chown=1000:50 files/ /app/
RUN rm /etc/group && ln -s ../etc/passwd /var/pw && mkdir -p /data/sub/deep && echo hello > /data/sub/f \\
 && ln /data/sub/f /data/hard && mkfifo /data/fifo && echo d > /data/sub/deep/x && chmod 0600 /etc/shadowed
RUN rm -rf /data/sub && mkdir /data/sub && echo again > /data/sub/g && rm /base/linked2 && chmod 0640 /base/disk
RUN rm -rf /var && mkdir /var && echo new > /var/only && ln /etc/same /base/new
RUN true
{extra}"""

# with a subuid range: a RUN chown, and a RUN as a non-root USER
MAPPED = """RUN chown 1000:1000 /etc/passwd && chown -R 2:2 /home/app && chown 7:7 /base/null
USER 1000:1000
RUN echo mine > /tmp/mine && mkdir /tmp/d && touch /tmp/d/x && ln /tmp/mine /tmp/mine2
USER 0
"""


def _extra_layer() -> bytes:
    """A second base layer: a hard-linked pair, a file to make the same again, devices (recorded files
    in a user namespace) and a file whose mode a RUN changes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, type_: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "", **kw: Any) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.linkname = type_, kw.get("mode", 0o644), 1700000000, link
            ti.devmajor, ti.devminor = kw.get("dev", (0, 0))
            ti.size = len(data) if type_ == tarfile.REGTYPE else 0
            tf.addfile(ti, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)

        add("base", tarfile.DIRTYPE, mode=0o755)
        add("base/linked1", data=b"shared\n")
        add("base/linked2", tarfile.LNKTYPE, link="base/linked1")
        add("base/linked3", tarfile.LNKTYPE, link="base/linked1")
        add("base/null", tarfile.CHRTYPE, dev=(1, 3), mode=0o666)
        add("base/disk", tarfile.BLKTYPE, dev=(8, 0), mode=0o660)
        add("etc/shadowed", data=b"secret\n")
        add("etc/same", data=b"same\n")
    return buf.getvalue()


@pytest.fixture(scope="module")
def base(rb: Any) -> str:
    path = os.path.join(os.path.dirname(rb.base), "copy-rung-base")  # both builder users read it
    write_oci_layout(path, [busybox_layer(), _extra_layer()])
    for dirpath, _, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    return path


def _context(runner: Any, base: str) -> str:
    return str(
        runner.context(
            {
                "Containerfile": CONTAINERFILE.format(base=base, extra=MAPPED if runner.has_range else ""),
                "files/a.txt": "a\n",
                "files/dir/b.bin": bytes(range(256)) * 100,
            }
        )
    )


def _build(runner: Any, base: str, driver: str, via_env: bool = False) -> tuple[str, dict[str, Any]]:
    """Build in a fresh store with `driver`; return the image id and the store's recorded strategy."""
    root = runner.fresh_root()
    if via_env:
        image = runner.build(
            _context(runner, base), root=root, env={"SOURCE_DATE_EPOCH": SDE, "RBUILD_STORAGE_DRIVER": driver}
        )
    else:
        image = runner.build(
            _context(runner, base), "--storage-driver", driver, root=root, env={"SOURCE_DATE_EPOCH": SDE}
        )
    with open(os.path.join(root, "store.json")) as f:
        return image, json.load(f)["strategy"]


def test_copy_and_overlay_give_the_same_image(rb: Any, base: str) -> None:
    overlay, s1 = _build(rb, base, "overlay")
    copy, s2 = _build(rb, base, "copy")
    assert (s1["rootfs"], s2["rootfs"]) == ("overlay", "copy")
    assert copy == overlay
    vfs, s3 = _build(rb, base, "vfs", via_env=True)  # buildah's name, from the environment
    assert (vfs, s3["rootfs"]) == (overlay, "copy")


def test_copy_and_overlay_give_the_same_image_single_uid(rb_single: Any, base: str) -> None:
    overlay, _ = _build(rb_single, base, "overlay")
    copy, s = _build(rb_single, base, "copy")
    assert s["rootfs"] == "copy"
    assert copy == overlay


def test_storage_driver_after_the_subcommand_and_unknown_ones(rb: Any, base: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{base}\nRUN echo x > /x\n"})
    root = rb.fresh_root()
    rb.run("build", "-q", "--storage-driver=copy", ctx, root=root)
    with open(os.path.join(root, "store.json")) as f:
        assert json.load(f)["strategy"]["rootfs"] == "copy"
    # a driver before the subcommand, refused with its reason: test_fuse_rung.test_forced_fuse_without_dev_fuse_says_why
    res = rb.run("build", "-q", ctx, root=root, check=False, env={"RBUILD_STORAGE_DRIVER": "zfs"})
    assert res.returncode == 125
    assert res.stderr.strip().startswith("Error: unknown storage driver 'zfs': choose one of overlay, fuse, copy")


@pytest.fixture
def overlay_store(rb: Any) -> Any:
    """A directory for the store on an overlayfs mount made by root (as a container's root filesystem)."""
    if os.geteuid() != 0:
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
        shutil.rmtree(d)


def test_overlay_store_forced_overlay_fails_automatic_copies(rb: Any, base: str, overlay_store: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{base}\nRUN echo x > /x && chmod 0600 /etc/group\n"})
    res = rb.run("build", "-q", "--storage-driver", "overlay", ctx, root=overlay_store, check=False)
    assert res.returncode == 125
    assert res.stderr.strip() == (
        f"Error: storage driver overlay cannot be used: kernel overlayfs cannot mount on {overlay_store} "
        "(filesystem type overlay): Invalid argument "
        "(give the store a local filesystem with --root, or use --storage-driver copy)"
    )
    image = rb.build(ctx, root=overlay_store)
    with open(os.path.join(overlay_store, "store.json")) as f:
        assert json.load(f)["strategy"]["rootfs"] == "copy"
    assert image == rb.build(ctx, "--storage-driver", "copy", root=overlay_store)  # the step cache holds it
    # a removal and an opaque dir: rbuild's xattr layer format, which this store took when it was made
    removal = rb.context({"Containerfile": f"FROM oci:{base}\nRUN rm /etc/group && rm -rf /base && mkdir /base\n"})
    sde = {"SOURCE_DATE_EPOCH": SDE}
    assert rb.build(removal, root=overlay_store, env=sde) == rb.build(removal, root=rb.fresh_root(), env=sde)
    with open(os.path.join(overlay_store, "store.json")) as f:
        assert json.load(f)["layer_format"] == "rbuild-xattr"


def _pushed(runner: Any, root: str, image: str) -> Any:
    out = runner.mkdir()
    runner.run("push", "-q", image, f"oci:{out}/layout", root=root)
    return ocitree.load(f"{out}/layout")


def test_unchanged_rewrite_is_no_layer_but_the_same_tree(rb: Any, base: str) -> None:
    """A RUN that writes a file back as it was: overlay copied it up, so its layer holds it; the copy rung
    finds nothing changed (metadata and bytes equal) and makes no layer. The images differ by that layer,
    their trees do not: a legitimate digest difference between the rungs."""
    script = 's=$(cat /etc/same) && echo "$s" > /etc/same && touch -d @1700000000 /etc/same'
    ctx = rb.context({"Containerfile": f"FROM oci:{base}\nRUN {script}\n"})
    images = {}
    for driver in ("overlay", "copy"):
        root = rb.fresh_root()
        images[driver] = _pushed(rb, root, rb.build(ctx, "--storage-driver", driver, root=root))
    assert len(images["overlay"].layers) == len(images["copy"].layers) + 1
    trees = [ocitree.flatten(images[d].layers) for d in ("overlay", "copy")]
    assert ocitree.diff_trees(*trees, names=("overlay", "copy")) == []
