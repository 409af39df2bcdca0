"""COPY of a directory into a new path: laid out while it is hashed, renamed into place whole (issue 15).

The cache-key pass reads each context file once and writes its copy, owner, mode, xattrs and times into a
staged tree (`copyfiles.StagedTree`); on a cache miss into a destination nothing exists at, COPY renames
that tree into the upper dir. The layer must be the one the file-by-file copy makes, whatever the tree
holds (hard links, sparse files, xattrs, symlinks out of the context, FIFOs, odd modes), and a context
file changed after it was hashed must not make the layer disagree with the cache key.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from typing import Any

import pytest
from conftest import busybox_layer, write_oci_layout

from rootless.build import copyfiles
from rootless.errors import RbuildError
from rootless.layer import layers

SDE = "1700000000"
OLD = 1_600_000_000 * 10**9  # the context's mtimes: older than SDE, so clamping leaves them as they are


def _user_xattrs_work(path: str) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
        os.removexattr(path, "user.probe")
    except OSError:
        return False
    return True


def _fill(ctx: str) -> None:
    """files/: the kinds of entries a context holds, the awkward ones included."""
    files = os.path.join(ctx, "files")
    for d in ("dir/sub", "other", "empty", "private"):
        os.makedirs(os.path.join(files, d), exist_ok=True)
    for rel, data in (("a.txt", b"a\n"), ("dir/b.bin", bytes(range(256)) * 300), ("dir/sub/c", b"c\n")):
        with open(os.path.join(files, rel), "wb") as f:
            f.write(data)
    os.link(os.path.join(files, "dir", "b.bin"), os.path.join(files, "dir", "b.link"))  # hard links, also
    os.link(os.path.join(files, "dir", "b.bin"), os.path.join(files, "other", "b.again"))  # across dirs
    with open(os.path.join(files, "sparse"), "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"island")
    os.symlink("/etc/passwd", os.path.join(files, "abs-link"))  # out of the context: copied as a symlink
    os.symlink("../../Containerfile", os.path.join(files, "dir", "up-link"))
    os.symlink("dir", os.path.join(files, "dir-link"))  # a symlink to a directory is not entered
    os.mkfifo(os.path.join(files, "pipe"))
    with open(os.path.join(files, "setuid"), "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(os.path.join(files, "setuid"), 0o4755)
    with open(os.path.join(files, "private", "secret"), "w") as f:
        f.write("s\n")
    os.chmod(os.path.join(files, "private", "secret"), 0o400)
    os.chmod(os.path.join(files, "private"), 0o700)
    if _user_xattrs_work(os.path.join(files, "a.txt")):
        os.setxattr(os.path.join(files, "a.txt"), "user.note", b"kept")
        os.setxattr(os.path.join(files, "dir"), "user.dirnote", b"kept too")
    for dirpath, dirnames, filenames in os.walk(files, topdown=False):
        for n in filenames + dirnames + ["."]:
            os.utime(os.path.join(dirpath, n), ns=(OLD, OLD), follow_symlinks=False)


def _hash_and_copy(ctx: str, work: str, tree: bool, chmod: copyfiles.Chmod | None = None) -> tuple[str, str, bool]:
    """A COPY files/ /data/ into an empty upper as the build does it: (cache key digest, upper, tree taken)."""
    stage, upper = os.path.join(work, "stage"), os.path.join(work, "upper")
    os.makedirs(stage)
    os.mkdir(upper)
    digests = copyfiles.FileDigests(None)
    digests.stage_dir = lambda: stage
    items = copyfiles.select(ctx, "files/", [], "COPY")
    staged_tree = None
    if tree:
        os.mkdir(os.path.join(stage, "tree"))
        staged_tree = copyfiles.StagedTree(os.path.join(stage, "tree"), items[0].host, chmod)
    h = hashlib.sha256()
    copyfiles.hash_sources(items, ctx, [], h, digests, staged_tree)
    if tree:  # everything read went into the tree (a hard link's second name too: a link, not a copy)
        assert os.listdir(stage) == ["tree"]
    digests.stage_dir = None
    items = copyfiles.select(ctx, "files/", [], "COPY")
    # the upper is its own merged view here: nothing below it, so the destination is new
    copyfiles.copy_into(
        upper, items, ctx, [], "/data/", (0, 0), chmod, "COPY", (upper, []), digests.staged, staged_tree
    )
    return h.hexdigest(), upper, tree and not os.path.exists(os.path.join(stage, "tree"))


def _diff_id(upper: str) -> str:
    st = os.lstat(os.path.join(upper, "data"))
    os.utime(os.path.join(upper, "data"), ns=(st.st_atime_ns, OLD))  # made now, by either path
    os.utime(upper, ns=(OLD, OLD))
    return layers.write_tar(upper, None)[0]


@pytest.mark.parametrize("chmod", [None, 0o751, "u=rwX,go=rX"])
def test_tree_gives_the_layer_of_the_file_by_file_copy(tmp_path: Any, chmod: str | int | None) -> None:
    ctx = str(tmp_path / "ctx")
    _fill(ctx)
    mode = copyfiles.parse_chmod(chmod, "COPY") if isinstance(chmod, str) else chmod
    key_tree, upper_tree, taken = _hash_and_copy(ctx, str(tmp_path / "t"), True, mode)
    key_plain, upper_plain, _ = _hash_and_copy(ctx, str(tmp_path / "p"), False, mode)
    assert taken  # the tree was renamed into place, not copied again
    assert key_tree == key_plain
    assert _diff_id(upper_tree) == _diff_id(upper_plain)
    data = os.path.join(upper_tree, "data")
    a, b = os.lstat(os.path.join(data, "dir", "b.bin")), os.lstat(os.path.join(data, "other", "b.again"))
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 3)
    assert os.readlink(os.path.join(data, "abs-link")) == "/etc/passwd"
    assert os.path.islink(os.path.join(data, "dir-link"))
    assert stat.S_ISFIFO(os.lstat(os.path.join(data, "pipe")).st_mode)
    with open(os.path.join(data, "sparse"), "rb") as f:
        f.seek(1 << 20)
        assert f.read(6) == b"island"
    if chmod is None:
        assert stat.S_IMODE(os.lstat(os.path.join(data, "setuid")).st_mode) == 0o4755
        assert os.lstat(os.path.join(data, "dir", "sub", "c")).st_mtime_ns == OLD


def test_a_known_digest_abandons_the_tree(tmp_path: Any) -> None:
    """A file whose digest is remembered is not read: the tree is incomplete, the copy goes file by file
    (taking the copies the tree did make) and gives the same layer."""
    ctx = str(tmp_path / "ctx")
    _fill(ctx)
    path = os.path.join(ctx, "files", "dir", "sub", "c")
    st = os.lstat(path)
    stage, upper = str(tmp_path / "stage"), str(tmp_path / "upper")
    os.makedirs(os.path.join(stage, "tree"))
    os.mkdir(upper)
    digests = copyfiles.FileDigests(None)
    digests.known[path] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, hashlib.sha256(b"c\n").hexdigest()]
    digests.stage_dir = lambda: stage
    items = copyfiles.select(ctx, "files/", [], "COPY")
    tree = copyfiles.StagedTree(os.path.join(stage, "tree"), items[0].host, None)
    copyfiles.hash_sources(items, ctx, [], hashlib.sha256(), digests, tree)
    assert not tree.complete
    copyfiles.copy_into(upper, items, ctx, [], "/data/", (0, 0), None, "COPY", (upper, []), digests.staged, tree)
    assert os.path.isdir(os.path.join(stage, "tree"))  # not taken
    _, upper_plain, _ = _hash_and_copy(ctx, str(tmp_path / "p"), False)
    assert _diff_id(upper) == _diff_id(upper_plain)


def test_a_file_changed_after_hashing_keeps_the_layer_on_the_key(tmp_path: Any) -> None:
    """The layer holds the content the cache key was computed from: the tree is what was read, once."""
    ctx = str(tmp_path / "ctx")
    _fill(ctx)
    stage, upper = str(tmp_path / "stage"), str(tmp_path / "upper")
    os.makedirs(os.path.join(stage, "tree"))
    os.mkdir(upper)
    digests = copyfiles.FileDigests(None)
    items = copyfiles.select(ctx, "files/", [], "COPY")
    tree = copyfiles.StagedTree(os.path.join(stage, "tree"), items[0].host, None)
    copyfiles.hash_sources(items, ctx, [], hashlib.sha256(), digests, tree)
    path = os.path.join(ctx, "files", "a.txt")
    hashed = str(digests.seen[path][4])
    with open(path, "w") as f:
        f.write("changed after the key was made\n")
    copyfiles.copy_into(upper, items, ctx, [], "/data/", (0, 0), None, "COPY", (upper, []), digests.staged, tree)
    with open(os.path.join(upper, "data", "a.txt"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == hashed


def test_an_existing_destination_is_not_replaced_by_the_tree(tmp_path: Any) -> None:
    """Only a new destination takes the tree: one that exists below is merged file by file."""
    ctx = str(tmp_path / "ctx")
    _fill(ctx)
    stage, lower, upper = str(tmp_path / "stage"), str(tmp_path / "lower"), str(tmp_path / "upper")
    os.makedirs(os.path.join(stage, "tree"))
    os.makedirs(os.path.join(lower, "data"))
    with open(os.path.join(lower, "data", "kept"), "w") as f:
        f.write("k\n")
    os.mkdir(upper)
    digests = copyfiles.FileDigests(None)
    items = copyfiles.select(ctx, "files/", [], "COPY")
    tree = copyfiles.StagedTree(os.path.join(stage, "tree"), items[0].host, None)
    copyfiles.hash_sources(items, ctx, [], hashlib.sha256(), digests, tree)
    copyfiles.copy_into(lower, items, ctx, [], "/data/", (0, 0), None, "COPY", (upper, [lower]), digests.staged, tree)
    assert os.path.exists(os.path.join(lower, "data", "kept"))
    assert os.path.exists(os.path.join(lower, "data", "a.txt"))  # through the "overlay" (the merged view)
    assert os.path.isdir(os.path.join(stage, "tree"))


def test_a_file_swapped_for_a_fifo_is_refused_not_read(tmp_path: Any) -> None:
    """lstat saw a regular file, the open finds a FIFO in its place: an error at once, never a hang."""
    path = str(tmp_path / "f")
    with open(path, "w") as f:
        f.write("x")
    st = os.lstat(path)
    os.unlink(path)
    os.mkfifo(path)
    start = time.monotonic()
    with pytest.raises(RbuildError, match="replaced while the build read it"):
        copyfiles.FileDigests(None).digest(path, st, str(tmp_path / "copy"))
    assert time.monotonic() - start < 60
    assert not os.path.exists(tmp_path / "copy")


@pytest.fixture(scope="module")
def base(rb: Any) -> str:
    path = os.path.join(os.path.dirname(rb.base), "copyfast-base")
    write_oci_layout(path, [busybox_layer()])
    for dirpath, _, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    return path


def test_builds_agree_with_the_copy_driver_and_a_warm_digest_cache(rb: Any, base: str) -> None:
    """The same image from: the overlay rung (trees renamed into place), the copy driver (no tree), and the
    overlay rung with every file's digest already known (tree abandoned, file by file)."""
    text = f"FROM oci:{base}\nARG SOURCE_DATE_EPOCH\nCOPY files/ /data/\nCOPY --chmod=0640 files /usr/new/deep\n"
    ctx = rb.context({"Containerfile": text})
    _fill(ctx)
    rb.own(ctx)
    env = {"SOURCE_DATE_EPOCH": SDE}
    overlay = rb.build(ctx, "--storage-driver", "overlay", root=rb.fresh_root(), env=env)
    copy = rb.build(ctx, "--storage-driver", "copy", root=rb.fresh_root(), env=env)
    warm = rb.fresh_root()
    other = rb.context({"Containerfile": f"FROM oci:{base}\nCOPY files/ /elsewhere/\n"})  # the same context's digests
    rb.build(ctx, "-f", os.path.join(other, "Containerfile"), "--storage-driver", "overlay", root=warm, env=env)
    again = rb.build(ctx, "--storage-driver", "overlay", root=warm, env=env)
    assert overlay == copy == again
