"""COPY into a new path writes straight into the overlay's upper dir (issue 15).

Where nothing of the destination exists in the tree or in any layer below, the overlay would only pass the
writes on to its upper dir: rbuild writes there itself, after copying up the destination's existing parent
directories as overlayfs does. The image must be the one the overlay path and the copy driver make.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

import pytest
from conftest import busybox_layer, write_oci_layout

from rootless.build import copyfiles

SDE = "1700000000"


def _tree(tmp: str) -> tuple[str, str, str, str]:
    """A lower layer, the merged view of it (a plain copy stands in for the overlay), an empty upper, a context."""
    lower, merged, upper, ctx = (os.path.join(tmp, n) for n in ("lower", "merged", "upper", "ctx"))
    os.makedirs(os.path.join(lower, "usr", "share"))
    os.chmod(os.path.join(lower, "usr"), 0o750)
    os.setxattr(os.path.join(lower, "usr"), "user.note", b"kept")
    os.utime(os.path.join(lower, "usr"), ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    os.makedirs(os.path.join(lower, "etc"))
    with open(os.path.join(lower, "etc", "old"), "w") as f:
        f.write("old\n")
    shutil.copytree(lower, merged, symlinks=True)
    for d in ("usr", os.path.join("usr", "share")):  # copytree keeps times; the xattr too, but be explicit
        st = os.lstat(os.path.join(lower, d))
        os.utime(os.path.join(merged, d), ns=(st.st_atime_ns, st.st_mtime_ns))
    os.mkdir(upper)
    os.makedirs(os.path.join(ctx, "src", "sub"))
    for rel, data in (("src/a", "a\n"), ("src/sub/b", "b\n")):
        with open(os.path.join(ctx, rel), "w") as f:
            f.write(data)
    return lower, merged, upper, ctx


def _copy(ctx: str, merged: str, upper: str, lower: str, dest: str) -> None:
    items = copyfiles.select(ctx, "src", [], "COPY")
    copyfiles.copy_into(merged, items, ctx, [], dest, (0, 0), None, "COPY", (upper, [lower]))


def test_new_destination_goes_to_the_upper_with_parents_copied_up(tmp_path: Any) -> None:
    lower, merged, upper, ctx = _tree(str(tmp_path))
    _copy(ctx, merged, upper, lower, "/usr/new/deep/")
    assert not os.path.exists(os.path.join(merged, "usr", "new"))  # nothing went through the "overlay"
    with open(os.path.join(upper, "usr", "new", "deep", "sub", "b")) as f:
        assert f.read() == "b\n"
    st = os.lstat(os.path.join(upper, "usr"))
    assert stat.S_IMODE(st.st_mode) == 0o750  # the copied-up parent is the lower one
    assert os.getxattr(os.path.join(upper, "usr"), "user.note") == b"kept"
    assert not os.path.exists(os.path.join(upper, "usr", "share"))  # only the path to dest is copied up
    assert not os.path.exists(os.path.join(upper, "etc"))


def test_existing_or_hidden_destination_goes_through_the_tree(tmp_path: Any) -> None:
    lower, merged, upper, ctx = _tree(str(tmp_path))
    _copy(ctx, merged, upper, lower, "/etc/")  # exists: the overlay must merge it
    assert os.path.exists(os.path.join(merged, "etc", "sub", "b"))
    assert os.listdir(upper) == []
    os.mkdir(os.path.join(lower, "gone"))  # in a layer below but not in the tree (a whiteout above hides it)
    _copy(ctx, merged, upper, lower, "/gone/")
    assert os.path.exists(os.path.join(merged, "gone", "a"))
    assert os.listdir(upper) == []


def test_destination_through_a_symlink_goes_through_the_tree(tmp_path: Any) -> None:
    """A symlink on the way to a new destination (in a layer below): the write must land where it points,
    not replace it with a directory in the upper (test_differential's symlink_paths found this)."""
    lower, merged, upper, ctx = _tree(str(tmp_path))
    for d in (lower, merged):
        os.symlink("/usr/share", os.path.join(d, "lnk"))
    _copy(ctx, merged, upper, lower, "/lnk/new/")
    assert os.path.exists(os.path.join(merged, "usr", "share", "new", "sub", "b"))
    assert os.listdir(upper) == []


CONTAINERFILE = """FROM oci:{base}
ARG SOURCE_DATE_EPOCH
COPY files/ /data/
COPY --chown=1000:50 files/ /usr/local/share/app/
COPY files/a.txt files/dir/ /opt/many/
COPY files/a.txt /etc/
COPY files/a.txt /srv/single
RUN rm -rf /data/dir && mkdir /data/dir
COPY files/ /data/dir/deeper/
"""


@pytest.fixture(scope="module")
def base(rb: Any) -> str:
    path = os.path.join(os.path.dirname(rb.base), "perf-copy-base")
    write_oci_layout(path, [busybox_layer()])
    for dirpath, _, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    return path


def test_direct_copies_give_the_image_of_the_copy_driver(rb: Any, base: str) -> None:
    ctx = rb.context(
        {
            "Containerfile": CONTAINERFILE.format(base=base),
            "files/a.txt": "a\n",
            "files/dir/b.bin": bytes(range(256)) * 100,
            "files/dir/sub/c": "c\n",
        }
    )
    images = {}
    for driver in ("overlay", "copy"):
        images[driver] = rb.build(ctx, "--storage-driver", driver, root=rb.fresh_root(), env={"SOURCE_DATE_EPOCH": SDE})
    assert images["overlay"] == images["copy"]
