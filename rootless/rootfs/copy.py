"""The copy rung: a step's tree is a plain directory copied from its parent's, and its layer is what a
walk of the two finds changed. No mount at all, so it works wherever files can be written.

Trees: the parent tree of a step is kept in the build's directory (`session`) and brought up to date by
applying the layers committed since (as the store keeps them), so a step copies one tree instead of
merging every lower. Kept trees are only read, so their files are hard links to the store's layer files;
each step copies the kept tree (a reflink where the filesystem can) to the tree it writes, and its layer
takes the changed inodes of that tree by hard links (the tree is thrown away after): the one data copy
of a step is the copy of its parent.

The diff is exact. After the copy a mark is stamped (a fresh file's ctime) and the clock is waited past
it: every change to an inode (content, mode, owner, times, xattrs, links) sets its ctime to now, and no
process can set a ctime. So a non-directory whose ctime is not past the mark is the parent's, untouched;
any other is compared with the parent's entry: type, mode, owner, size, mtime, xattrs, link target,
device number, and at last the bytes of a regular file. A directory is the parent's one only if it has
the inode recorded at the copy and was not created after the mark (inode numbers are given again);
otherwise it was replaced and goes in whole, opaque when the parent had that name (as overlay's mkdir
over a whiteout). A directory whose ctime passed the mark is listed against the parent's for whiteouts.
Names of one inode: when one goes in, all the tree's names of it go in, linked (overlay copies up the
source of a `ln`, so `ln old new` gives both names in its layer too).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from rootless.errors import RbuildError
from rootless.kernel import linux
from rootless.layer.format import FORMATS, MARKERS, LayerFormat, is_opaque, is_whiteout
from rootless.rootfs.driver import RootfsDriver, WritableRoot

_PRIVATE_XATTRS = ("user.overlay.", *MARKERS)  # the layer formats' markers: interpreted, never copied into a tree
_FICLONE = 0x40049409
_CHUNK = 1 << 20
_KEPT_TREES = 2  # parent trees kept between steps: the current stage's, and one more (another stage)


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    found = {}
    for n in names:
        if not n.startswith(_PRIVATE_XATTRS):
            with contextlib.suppress(OSError):  # one the namespace may not read (trusted.*, some security.*)
                found[n] = os.getxattr(path, n, follow_symlinks=False)
    return found


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class _Copier:
    """Copies entries with everything a layer keeps; names of one source inode become hard links.

    `link`: a non-directory becomes a hard link to its source where the filesystem allows (for trees
    nothing writes to, and for a layer taken from a tree thrown away after): no data is copied, and the
    inode numbers that `user.rbuild.lstat` records name stay true."""

    def __init__(self, link: bool = False) -> None:
        self.link = link
        self.reflink = True
        self.links: dict[tuple[int, int], str] = {}
        self.seen: set[tuple[int, int]] = set()  # every source inode given a name

    def entry(self, src: str, st: os.stat_result, dst: str) -> None:
        """Copy the non-directory `src` (lstat `st`) to the new name `dst`."""
        key = (st.st_dev, st.st_ino)
        self.seen.add(key)
        if self.link:
            try:
                os.link(src, dst, follow_symlinks=False)
                return
            except OSError:
                self.link = False  # another filesystem, or links refused here: copy from now on
        if st.st_nlink > 1:
            first = self.links.get(key)
            if first is not None:
                os.link(first, dst, follow_symlinks=False)
                return
        m = st.st_mode
        if stat.S_ISREG(m):
            self._file(src, dst)
        elif stat.S_ISLNK(m):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISFIFO(m):
            os.mkfifo(dst, 0o600)
        else:
            try:
                os.mknod(dst, stat.S_IFMT(m) | 0o600, st.st_rdev)
            except PermissionError:
                raise RbuildError(
                    f"cannot make the device {src} in a copy of the tree: this namespace may not make devices"
                ) from None
        self.meta(src, st, dst)
        if st.st_nlink > 1:
            self.links[key] = dst

    def _file(self, src: str, dst: str) -> None:
        sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if self.reflink:
                    try:
                        fcntl.ioctl(dfd, _FICLONE, sfd)
                        return
                    except OSError:
                        self.reflink = False  # this filesystem cannot share extents: copy from now on
                try:
                    while os.copy_file_range(sfd, dfd, _CHUNK * 64):
                        pass
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    while os.sendfile(dfd, sfd, None, _CHUNK * 64):
                        pass
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def meta(self, src: str, st: os.stat_result, dst: str, replace_xattrs: bool = False) -> None:
        """Owner, mode, xattrs and times of `src` onto `dst` (chown first: it clears set-id bits)."""
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(dst, stat.S_IMODE(st.st_mode))
            want = _xattrs(src)
            if replace_xattrs:
                for name in _xattrs(dst).keys() - want.keys():
                    os.removexattr(dst, name)
            for name, value in want.items():
                try:
                    os.setxattr(dst, name, value)
                except OSError:
                    if name.startswith("user."):
                        raise  # rbuild's records and the image's own user xattrs must survive
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _merge(copier: _Copier, sources: list[str], dst: str, dirs: dict[str, int] | None, rel: str) -> None:
    """Fill the existing directory `dst` with the merged contents of `sources` (one directory per layer,
    top first, as overlay merges them); `dirs` gets each directory made (relative path -> inode)."""
    seen: set[str] = set()
    for i, src in enumerate(sources):
        with os.scandir(src) as it:
            entries = list(it)
        for e in entries:
            if e.name in seen:
                continue
            seen.add(e.name)
            st = e.stat(follow_symlinks=False)
            if is_whiteout(st, e.path):
                continue
            d = os.path.join(dst, e.name)
            if not stat.S_ISDIR(st.st_mode):
                copier.entry(e.path, st, d)
                continue
            subs = [e.path]
            if i + 1 < len(sources) and not is_opaque(e.path):
                for lower in sources[i + 1 :]:
                    p = os.path.join(lower, e.name)
                    try:
                        lst = os.lstat(p)
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISDIR(lst.st_mode):
                        break  # a file or whiteout below hides everything under it
                    subs.append(p)
                    if is_opaque(p):
                        break
            os.mkdir(d, 0o700)
            crel = os.path.join(rel, e.name)
            if dirs is not None:
                dirs[crel] = os.lstat(d).st_ino
            _merge(copier, subs, d, dirs, crel)
            copier.meta(e.path, st, d)


def _apply(copier: _Copier, layer: str, tree: str) -> None:
    """Apply the layer directory `layer` to the merged tree `tree` in place (what overlay shows)."""
    with os.scandir(layer) as it:
        entries = list(it)
    for e in entries:
        st = e.stat(follow_symlinks=False)
        d = os.path.join(tree, e.name)
        try:
            old: os.stat_result | None = os.lstat(d)
        except FileNotFoundError:
            old = None
        if is_whiteout(st, e.path):
            if old is not None:
                _remove(d)
            continue
        if not stat.S_ISDIR(st.st_mode):
            if old is not None:
                _remove(d)
            copier.entry(e.path, st, d)
            continue
        if old is not None and (not stat.S_ISDIR(old.st_mode) or is_opaque(e.path)):
            _remove(d)
            old = None
        if old is None:
            os.mkdir(d, 0o700)
        _apply(copier, e.path, d)
        copier.meta(e.path, st, d, replace_xattrs=True)


def materialise(lowers: list[str], dst: str, dirs: dict[str, int] | None = None, link: bool = False) -> None:
    """The merged tree of `lowers` (top first) in the existing empty directory `dst`; `link`: of hard links
    to their files where possible (a tree that is only read)."""
    copier = _Copier(link)
    _merge(copier, lowers, dst, dirs, "")
    if lowers:
        copier.meta(lowers[0], os.lstat(lowers[0]), dst)


def _stamp(path: str) -> int:
    """A mark no earlier than every change made so far, and wait until the clock has passed it: each
    later change to an inode gives it a ctime past the mark."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    mark = os.lstat(path).st_ctime_ns
    while True:
        os.utime(path)
        if os.lstat(path).st_ctime_ns > mark:
            return mark
        time.sleep(0.001)


@dataclass
class _Tree:
    key: tuple[str, ...]  # the lowers it is the merge of, top first
    path: str
    in_use: int = 0


class CopyDriver(RootfsDriver):
    """Copies trees; no mounts. Parent trees are kept in the build's directory between steps."""

    name = "copy"
    keeps_trees = True

    formats = tuple(FORMATS)  # it reads both, and writes the store's

    def __init__(self) -> None:
        self._home: str | None = None
        self._trees: list[_Tree] = []  # least recently used first
        self._lock = threading.Lock()  # stages built at once pick and update kept trees in turn

    @contextlib.contextmanager
    def session(self, home: str) -> Iterator[None]:
        self._home = home
        try:
            yield
        finally:
            self._home = None
            self._trees = []

    @contextlib.contextmanager
    def view(self, lowers: list[str], target: str) -> Iterator[str]:
        if len(lowers) == 1:  # a layer dir is its own tree (as overlay's bind of one lower)
            yield lowers[0]
            return
        try:
            materialise(lowers, target, link=True)
            yield target
        finally:
            for name in os.listdir(target):
                _remove(os.path.join(target, name))

    @contextlib.contextmanager
    def writable(self, lowers: list[str], workdir: str, target: str) -> Iterator[WritableRoot]:
        """The tree is made in `workdir` (the store's filesystem, where reflinks can share extents);
        `target` stays unused: nothing is mounted."""
        with self._lock:
            tree = self._parent(lowers, workdir)
            tree.in_use += 1
        try:
            path, layer = os.path.join(workdir, "tree"), os.path.join(workdir, "layer")
            os.mkdir(path, 0o700)
            os.mkdir(layer, 0o755)
            dirs: dict[str, int] = {}
            materialise([tree.path], path, dirs)
            mark = _stamp(os.path.join(workdir, "copy-mark"))
            yield _CopyRoot(path, tree.path, layer, mark, dirs, self.layer_format)
        finally:
            tree.in_use -= 1

    def _parent(self, lowers: list[str], workdir: str) -> _Tree:
        """The merged tree of `lowers`: a kept tree whose lowers end the list, brought up to date, else
        a new one (in the build's directory, or in `workdir` outside a session)."""
        key = tuple(lowers)
        best = None
        for t in self._trees:
            n = len(t.key)
            if not t.in_use and key[len(key) - n :] == t.key and (best is None or n > len(best.key)):
                best = t
        if best is not None:
            copier = _Copier(link=True)
            for layer in reversed(key[: len(key) - len(best.key)]):
                _apply(copier, layer, best.path)
            if key and key != best.key:  # the root as a fresh merge has it: the top layer's
                copier.meta(key[0], os.lstat(key[0]), best.path, replace_xattrs=True)
            best.key = key
            self._trees.remove(best)
            self._trees.append(best)
            return best
        if self._home is None:
            path = os.path.join(workdir, "parent")
            os.mkdir(path, 0o700)
            materialise(lowers, path, link=True)
            return _Tree(key, path)
        best = _Tree(key, tempfile.mkdtemp(prefix="tree-", dir=self._home))
        materialise(lowers, best.path, link=True)
        self._trees.append(best)
        for old in [t for t in self._trees if not t.in_use][:-_KEPT_TREES]:
            self._trees.remove(old)
            shutil.rmtree(old.path)
        return best


class _CopyRoot(WritableRoot):
    def __init__(self, path: str, parent: str, layer: str, mark: int, dirs: dict[str, int], fmt: LayerFormat) -> None:
        super().__init__(path)
        self.fmt = fmt
        self.parent = parent
        self.layer = layer
        self.mark = mark
        self.dirs = dirs

    def diff(self) -> str:
        _Diff(self).walk("")
        return self.layer


class _Diff:
    """The walk of a step's tree against its parent that writes the step's layer (see the module doc)."""

    def __init__(self, root: _CopyRoot) -> None:
        self.tree, self.parent, self.out = root.path, root.parent, root.layer
        self.mark, self.dirs, self.fmt = root.mark, root.dirs, root.fmt
        self.copier = _Copier(link=True)  # the tree is thrown away after: its inodes become the layer's
        self.made: list[str] = []  # directories made in the layer, parents first
        self.linked: list[tuple[str, os.stat_result]] = []  # names of inodes with more than one

    def walk(self, rel: str) -> None:
        self._walk(rel)
        for crel, st in self.linked:  # the other names of an inode that went in go in as links to it
            if (st.st_dev, st.st_ino) in self.copier.seen and not os.path.lexists(os.path.join(self.out, crel)):
                self._ensure(os.path.dirname(crel))
                self.copier.entry(os.path.join(self.tree, crel), st, os.path.join(self.out, crel))
        for d in reversed(self.made):  # children before parents: their times stay as the tree has them
            src = os.path.join(self.tree, d)
            self.copier.meta(src, os.lstat(src), os.path.join(self.out, d))

    def _walk(self, rel: str) -> None:
        t = os.path.join(self.tree, rel)
        with os.scandir(t) as it:
            entries = list(it)
        for e in entries:
            crel = os.path.join(rel, e.name)
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                pst = self._parent_stat(crel)
                if pst is not None and stat.S_ISDIR(pst.st_mode) and self._same_dir(crel, st):
                    self._walk(crel)
                    if st.st_ctime_ns > self.mark and crel not in self.made and self._differs(crel, st, pst):
                        self._ensure(crel)
                else:
                    self._add_tree(crel, st, opaque=pst is not None)
                continue
            if st.st_nlink > 1:
                self.linked.append((crel, st))
            if st.st_ctime_ns > self.mark:
                pst = self._parent_stat(crel)
                if pst is None or self._differs(crel, st, pst):
                    self._ensure(rel)
                    self.copier.entry(e.path, st, os.path.join(self.out, crel))
        if os.lstat(t).st_ctime_ns > self.mark:  # entries may have gone
            names = {e.name for e in entries}
            for name in os.listdir(os.path.join(self.parent, rel)):
                if name not in names:
                    self._ensure(rel)
                    self._whiteout(os.path.join(rel, name))

    def _whiteout(self, rel: str) -> None:
        path = os.path.join(self.out, rel)
        try:
            self.fmt.make_whiteout(path)
        except PermissionError:
            raise RbuildError(
                f"cannot record that /{rel} was removed: the store's filesystem refuses the {self.fmt.name} "
                "layer format's whiteout (use a new --root, which takes the format its filesystem allows)"
            ) from None
        os.chmod(path, 0)  # as overlay makes it (the tar keeps modes)

    def _parent_stat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(os.path.join(self.parent, rel))
        except FileNotFoundError:
            return None

    def _same_dir(self, rel: str, st: os.stat_result) -> bool:
        """The directory the copy made (not one made since in its place)."""
        if self.dirs.get(rel) != st.st_ino:
            return False
        if st.st_ctime_ns <= self.mark:
            return True
        born = linux.birth_time_ns(os.path.join(self.tree, rel))
        return born is None or born <= self.mark

    def _differs(self, rel: str, st: os.stat_result, pst: os.stat_result) -> bool:
        t, p = os.path.join(self.tree, rel), os.path.join(self.parent, rel)
        m = st.st_mode
        if (m, st.st_uid, st.st_gid, st.st_mtime_ns) != (pst.st_mode, pst.st_uid, pst.st_gid, pst.st_mtime_ns):
            return True
        if stat.S_ISDIR(m):
            return _xattrs(t) != _xattrs(p)
        if st.st_size != pst.st_size or st.st_rdev != pst.st_rdev:
            return True
        if stat.S_ISLNK(m):
            return os.readlink(t) != os.readlink(p)
        if _xattrs(t) != _xattrs(p):
            return True
        return stat.S_ISREG(m) and not _same_bytes(t, p)

    def _ensure(self, rel: str) -> None:
        """The directory `rel` of the tree made in the layer (with its parents); metadata comes last."""
        if not rel or rel in self.made:
            return
        self._ensure(os.path.dirname(rel))
        os.mkdir(os.path.join(self.out, rel), 0o700)
        self.made.append(rel)

    def _add_tree(self, rel: str, st: os.stat_result, opaque: bool) -> None:
        self._ensure(os.path.dirname(rel))
        d = os.path.join(self.out, rel)
        os.mkdir(d, 0o700)
        src = os.path.join(self.tree, rel)
        _merge(self.copier, [src], d, None, rel)
        self.copier.meta(src, st, d)
        if opaque:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                self.fmt.set_opaque(fd)
            finally:
                os.close(fd)


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True
