"""Layers: unpack tar layers into overlay lower dirs, and write them back as deterministic tar streams.

The local store keeps every layer unpacked, in the store's layer format (`rootless.layer.format`, the one
place that knows how whiteouts and opaque dirs are marked): kernel-overlay lower dirs (`userxattr` mode),
or rbuild's own xattr markers on a store whose filesystem refuses those (an overlayfs).

Some things a layer holds cannot be created by an unprivileged user, so they are recorded in xattrs of
rbuild's own ``user.rbuild.*`` namespace, which `write_tar` turns back into the original tar entry:

* ``user.rbuild.dev`` = ``c:MAJOR:MINOR`` or ``b:MAJOR:MINOR`` on an empty regular file: a character or
  block device node (every device entry, including a 0:0 character device that is not a whiteout, so
  that it is never mistaken for one). The file's mode and owner are the device's.
* ``user.rbuild.stat`` = ``UID:GID`` on a regular file or directory: its owner in the image, where
  chown to it was impossible (a single-uid map, or an id outside the mapped range).
* ``user.rbuild.lstat`` on a directory: the same for those of its children that cannot carry ``user.*``
  xattrs (symlinks, fifos, whiteouts), as ``NAME\\0UID:GID:INODE\\0`` repeated. The inode number ties
  a record to the very child it was made for: overlay copies the directory's xattrs up when a RUN step
  writes into it, and a symlink that step creates under the same name must not inherit the owner.

Such records are never read from a layer: ``user.rbuild.*`` and ``user.overlay.*`` xattrs in a tar are
dropped at unpack. Nor from what a RUN wrote (it can set ``user.*`` xattrs): `normalize` keeps a record
in a RUN's upper dir only where the lower layers hold it at the same path (see `_Scrub`). A malformed
record is a `LayerError`. Kept xattrs are ``user.*`` and ``security.capability`` (file capabilities);
others (``trusted.*``, ``security.selinux``, ACLs) cannot be set unprivileged and would make output
host-dependent.

Unpacking never follows a symlink and never touches anything outside `dest`: every path is walked from
a directory fd with O_NOFOLLOW, a parent that is a symlink (in this layer or in the merged view of the
lower layers) is refused, entries are created with O_EXCL. Errors are `LayerError`, one line naming the
entry and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import queue
import re
import shutil
import stat
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

from rootless.blob.verify import BlobMismatch, Verifier, VerifyingReader
from rootless.errors import RbuildError
from rootless.layer import format as lformat
from rootless.layer.format import FORMAT, LayerFormat, is_opaque, is_whiteout
from rootless.layer.ownership import Ownership

__all__ = [
    "LayerError",
    "UnpackLimits",
    "unpack",
    "normalize",
    "write_tar",
    "open_blob",
    "set_owner",
    "set_owner_at",
    "owner_at",
    "make_device_at",
    "in_lowers",
    "holds_records",
]

XATTR_DEV = "user.rbuild.dev"
XATTR_STAT = "user.rbuild.stat"
XATTR_LSTAT = "user.rbuild.lstat"

CHUNK = 1 << 20  # write_tar emits the stream in blocks of exactly this size (compressor input is fixed)
MAX_DEPTH = 512  # path components of an unpacked entry; write_tar holds one fd per level
_META_MAX = 1 << 20  # largest PAX / GNU long-name header accepted (they are read into memory)
MAX_SPARSE_CHUNKS = 1 << 20  # data chunks of one sparse file (its map is held in memory)
_DIRFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WH = b".wh."
_OPQ = b".wh..wh..opq"


class LayerError(RbuildError):
    """A layer that cannot be unpacked or written: names the entry and the cause."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        raise RbuildError(f"{name}={os.environ[name]!r}: expected a number of bytes") from None


@dataclass
class UnpackLimits:
    """Bounds against size and decompression bombs; defaults are generous for real images.

    The defaults can be changed with RBUILD_MAX_LAYER_BYTES (uncompressed bytes of one layer, sparse
    holes included) and RBUILD_MAX_LAYER_ENTRIES.
    """

    max_bytes: int = field(default_factory=lambda: _env_int("RBUILD_MAX_LAYER_BYTES", 64 << 30))
    max_entries: int = field(default_factory=lambda: _env_int("RBUILD_MAX_LAYER_ENTRIES", 10_000_000))


# --------------------------------------------------------------------------------------------- helpers


def _keep_xattr(name: str) -> bool:
    """The xattrs a layer carries: user.* (not overlay's or rbuild's private ones) and file capabilities."""
    if name.startswith("user."):
        return not name.startswith(("user.overlay.", "user.rbuild."))
    return name == "security.capability"


_IDS_RE = re.compile(rb"(\d{1,10}):(\d{1,10})")
_LSTAT_RE = re.compile(rb"(\d{1,10}):(\d{1,10}):(\d{1,20})")
_DEV_RE = re.compile(rb"([cb]):(\d{1,7}):(\d{1,7})")


def _malformed(name: str, value: bytes, where: bytes) -> LayerError:
    shown = value if len(value) <= 64 else value[:64] + b"..."
    return LayerError(f"layer entry {os.fsdecode(where) or '.'!r}: malformed {name} record {shown!r}")


def _parse_ids(value: bytes, where: bytes) -> tuple[int, int]:
    m = _IDS_RE.fullmatch(value)
    if m is None or max(int(m[1]), int(m[2])) > _MAX_ID:
        raise _malformed(XATTR_STAT, value, where)
    return int(m[1]), int(m[2])


def _parse_lstat(value: bytes, where: bytes) -> dict[bytes, tuple[int, int, int]]:
    """name -> (uid, gid, inode) of a user.rbuild.lstat record."""
    parts = value.split(b"\0")
    if len(parts) % 2 != 1 or parts[-1]:
        raise _malformed(XATTR_LSTAT, value, where)
    out = {}
    for i in range(0, len(parts) - 1, 2):
        m = _LSTAT_RE.fullmatch(parts[i + 1])
        if m is None or not parts[i] or b"/" in parts[i] or max(int(m[1]), int(m[2])) > _MAX_ID:
            raise _malformed(XATTR_LSTAT, value, where)
        out[parts[i]] = (int(m[1]), int(m[2]), int(m[3]))
    return out


def parse_ids(value: bytes) -> tuple[int, int]:
    """(uid, gid) of a user.rbuild.stat record (LayerError if malformed)."""
    return _parse_ids(value, b"")


def parse_dev(value: bytes) -> tuple[bytes, int, int]:
    """(b"c" or b"b", major, minor) of a user.rbuild.dev record (LayerError if malformed)."""
    return _parse_dev(value, b"")


def _parse_dev(value: bytes, where: bytes) -> tuple[bytes, int, int]:
    """(b"c" or b"b", major, minor) of a user.rbuild.dev record."""
    m = _DEV_RE.fullmatch(value)
    if m is None:
        raise _malformed(XATTR_DEV, value, where)
    return m[1], int(m[2]), int(m[3])


def _fmt_lstat(dfd: int, records: dict[bytes, tuple[int, int]]) -> bytes:
    """The record for children of `dfd`, each stamped with its current inode (missing ones dropped)."""
    out = []
    for name, (uid, gid) in sorted(records.items()):
        try:
            ino = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino
        except FileNotFoundError:
            continue
        out.append(b"%s\0%d:%d:%d\0" % (name, uid, gid, ino))
    return b"".join(out)


def disk_owner(st: os.stat_result) -> tuple[int, int]:
    """The image owner a file's on-disk owner stands for: its own ids, except that without a user
    namespace (rung 5, owners recorded) the caller's own uid and gid stand for 0, as they do in one."""
    euid, egid = os.geteuid(), os.getegid()
    return (0 if euid and st.st_uid == euid else st.st_uid, 0 if euid and st.st_gid == egid else st.st_gid)


def _child_owner(lrec: dict[bytes, tuple[int, int, int]], name: bytes, st: os.stat_result) -> tuple[int, int]:
    rec = lrec.get(name)
    return (rec[0], rec[1]) if rec is not None and rec[2] == st.st_ino else disk_owner(st)


def _getxattr(target: int | str | bytes, name: str, **kw: object) -> bytes | None:
    try:
        return os.getxattr(target, name, **kw)  # type: ignore[arg-type]
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def image_owner(path: str, st: os.stat_result) -> tuple[int, int]:
    """The owner `path` has in the image: its record (or its parent's, for a symlink or fifo), else st's.

    For copies out of a tree (COPY --from keeps owners) where the namespace could not chown.
    """
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        rec = _getxattr(path, XATTR_STAT, follow_symlinks=False)
        if rec is not None:
            return _parse_ids(rec, os.fsencode(path))
        return st.st_uid, st.st_gid
    parent, name = os.path.split(path)
    recs = _parse_lstat(_getxattr(parent or ".", XATTR_LSTAT) or b"", os.fsencode(parent))
    found = recs.get(os.fsencode(name))
    if found is not None and found[2] == st.st_ino:
        return found[0], found[1]
    return st.st_uid, st.st_gid


def set_owner(path: str, uid: int, gid: int, *, ownership: Ownership = Ownership.MAPPED) -> None:
    """chown without following symlinks, or record the owner where the user namespace cannot map it.

    For COPY --chown and the like: `write_tar` emits the recorded owner. A symlink's or fifo's
    unmappable owner goes into its parent's record.
    """
    parent, name = os.path.split(os.path.abspath(path))
    pfd = os.open(parent, _DIRFLAGS)
    try:
        set_owner_at(pfd, os.fsencode(name), uid, gid, ownership=ownership)
    finally:
        os.close(pfd)


def set_owner_at(pfd: int, bname: bytes, uid: int, gid: int, *, ownership: Ownership = Ownership.MAPPED) -> None:
    """`set_owner` of the entry `bname` in the directory open as `pfd` (a single-uid RUN's supervisor)."""
    st = os.stat(bname, dir_fd=pfd, follow_symlinks=False)
    can_xattr = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
    fd = _open_meta(pfd, bname) if can_xattr else None
    try:
        rec = _Owner(ownership).own(uid, gid, pfd=pfd, name=bname, fd=fd, fresh=False)
    finally:
        if fd is not None:
            os.close(fd)
    old = _parse_lstat(_getxattr(pfd, XATTR_LSTAT) or b"", bname)
    recs = {}
    for n, (u, g, ino) in old.items():  # only records still about the same child survive a rewrite
        with contextlib.suppress(FileNotFoundError):
            if os.stat(n, dir_fd=pfd, follow_symlinks=False).st_ino == ino:
                recs[n] = (u, g)
    if rec is not None:
        recs[bname] = rec
    elif recs.pop(bname, None) is None:
        return
    os.setxattr(pfd, XATTR_LSTAT, _fmt_lstat(pfd, recs))


def owner_at(pfd: int, bname: bytes) -> tuple[int, int]:
    """The owner the image gives the entry `bname` of `pfd`: its record, else the owner the namespace shows."""
    st = os.stat(bname, dir_fd=pfd, follow_symlinks=False)
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        fd = _open_meta(pfd, bname)
        try:
            rec = _getxattr(fd, XATTR_STAT)
        finally:
            os.close(fd)
        return _parse_ids(rec, bname) if rec else (st.st_uid, st.st_gid)
    return _child_owner(_parse_lstat(_getxattr(pfd, XATTR_LSTAT) or b"", bname), bname, st)


def make_device_at(pfd: int, bname: bytes, kind: bytes, major: int, minor: int, mode: int) -> None:
    """A device node as a layer dir holds it: an empty file with a ``user.rbuild.dev`` record (mknod)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(bname, flags, 0o600, dir_fd=pfd)
    try:
        os.setxattr(fd, XATTR_DEV, b"%s:%d:%d" % (kind, major, minor))
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _open_meta(pfd: int, name: bytes) -> int:
    """An fd for metadata calls on a regular file or directory (never follows, never blocks)."""
    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=pfd)


class _Owner:
    """Applies owners: chown where the namespace maps the ids, else a user.rbuild.* record."""

    def __init__(self, ownership: Ownership) -> None:
        self.ownership = ownership

    def own(
        self, uid: int, gid: int, *, pfd: int, name: bytes, fd: int | None, fresh: bool = True
    ) -> tuple[int, int] | None:
        """Own `fd` (a file or dir), else `name` in `pfd` (no follow); returns ids to record in the parent.

        `fresh`: created by us just now, so it carries no stale record to clear.
        """
        if fd is not None and not fresh:
            try:
                os.removexattr(fd, XATTR_STAT)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise
        # recorded: every file is the caller's (0:0 in its single-uid namespace, its own ids without one)
        recorded = self.ownership is Ownership.RECORDED
        want = (os.geteuid(), os.getegid()) if recorded else (uid, gid)
        try:
            if fd is not None:
                os.chown(fd, *want)
            else:
                os.chown(name, *want, dir_fd=pfd, follow_symlinks=False)
            if (uid, gid) == ((0, 0) if recorded else want):
                return None
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EPERM):
                raise
        if fd is None:
            return (uid, gid)
        os.setxattr(fd, XATTR_STAT, b"%d:%d" % (uid, gid))
        return None


# --------------------------------------------------------------------------------------------- unpack


class _Info(tarfile.TarInfo):
    """TarInfo that bounds in-memory headers and reads old-GNU sparse maps whose first chunk is at 0."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        meta = (
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE,
        )
        if self.type in meta and self.size > _META_MAX:
            raise LayerError(
                f"layer entry {self.name!r}: extended header of {self.size} bytes exceeds the limit of {_META_MAX}"
            )
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]  # private, not in typeshed
        return member

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str], tarfile_: tarfile.TarFile) -> None:
        """PAX 1.0 sparse map, read from the data into memory: its announced length is bounded first."""
        read = tarfile_.fileobj.read
        head, buf = read(tarfile.BLOCKSIZE).split(b"\n", 1)
        fields = int(head)
        if fields > MAX_SPARSE_CHUNKS:
            raise LayerError(f"layer entry {next.name!r}: sparse map of more than {MAX_SPARSE_CHUNKS} chunks")
        numbers: list[int] = []
        while len(numbers) < fields * 2:
            if b"\n" not in buf:
                more = read(tarfile.BLOCKSIZE)
                if not more:
                    raise tarfile.ReadError("unexpected end of data")
                buf += more
            number, buf = buf.split(b"\n", 1)
            numbers.append(int(number))
        next.offset_data = tarfile_.fileobj.tell()
        next.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))  # type: ignore[assignment]

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        structs, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        structs = [(o, n) for o, n in structs if o or n]
        while isextended:
            buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            if len(buf) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data")
            if len(structs) > MAX_SPARSE_CHUNKS:
                raise LayerError(f"layer entry {self.name!r}: sparse map of more than {MAX_SPARSE_CHUNKS} chunks")
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = tarfile.nti(buf[pos : pos + 12])  # type: ignore[attr-defined]
                    numbytes = tarfile.nti(buf[pos + 12 : pos + 24])  # type: ignore[attr-defined]
                except ValueError:
                    break
                if offset or numbytes:
                    structs.append((offset, numbytes))
            isextended = bool(buf[504])
        self.sparse = structs  # type: ignore[assignment]
        self.offset_data = tarfile_.fileobj.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = origsize
        return self


class _Counted(io.RawIOBase):
    """Counts the uncompressed tar bytes read: the decompression-bomb guard."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self.stream, self.limit, self.count = stream, limit, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n if n >= 0 else CHUNK)
        self.count += len(data)
        if self.count > self.limit:
            raise LayerError(
                f"layer: uncompressed size exceeds the limit of {self.limit} bytes "
                "(a decompression bomb? RBUILD_MAX_LAYER_BYTES)"
            )
        return data


class _Missing(Exception):
    """A directory looked up without creating it does not exist."""


def _split(name: str, what: str = "path") -> tuple[bytes, ...]:
    """Components of an entry name; refuses absolute names and `..` (never cleaned away silently)."""
    raw = os.fsencode(name)
    shown = "" if what == "path" else f" {name!r}"
    if b"\0" in raw:
        raise LayerError(f"{what}{shown} contains a null byte")
    if raw.startswith(b"/"):
        raise LayerError(f"absolute {what}{shown}")
    comps = tuple(c for c in raw.split(b"/") if c and c != b".")
    if b".." in comps:
        raise LayerError(f"{what}{shown} leads outside the layer (..)")
    return comps


def _show(comps: tuple[bytes, ...]) -> str:
    return os.fsdecode(b"/".join(comps)) or "."


class _Unpacker:
    whiteouts = True  # `.wh.` names are overlay whiteouts (a layer); a plain archive has none

    def __init__(
        self, dest: str, lowers: Sequence[str], ownership: Ownership, limits: UnpackLimits, fmt: LayerFormat
    ) -> None:
        self.root = os.open(dest, _DIRFLAGS)
        self.fmt = fmt
        self.lowers = [os.fsencode(os.path.abspath(p)) for p in lowers]
        self.owner = _Owner(ownership)
        self.limits = limits
        self.total = 0
        self.entries = 0
        self.cache: tuple[tuple[bytes, ...], int] | None = None
        self.opaque: set[tuple[bytes, ...]] = set()
        self.dirmeta: dict[tuple[bytes, ...], tuple[int, int]] = {}  # mode, mtime ns: set after contents
        self.lrec: dict[tuple[bytes, ...], dict[bytes, tuple[int, int]]] = {}

    def close(self) -> None:
        self._uncache()
        os.close(self.root)

    # ----- walking

    def _uncache(self) -> None:
        if self.cache is not None:
            os.close(self.cache[1])
            self.cache = None

    def parent(self, comps: tuple[bytes, ...], create: bool = True) -> int | None:
        """fd of directory `comps` in dest (owned by the cache), creating missing dirs like overlay copy-up.

        Never follows a symlink: a component that is a symlink here or in the lower layers is refused.
        """
        if not comps:
            return self.root
        if self.cache is not None and self.cache[0] == comps:
            return self.cache[1]
        fd = self.root
        try:
            for i, c in enumerate(comps):
                prefix = comps[: i + 1]
                try:
                    nfd = os.open(c, _DIRFLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise _Missing from None
                    nfd = self._implicit(fd, prefix, whiteout=False)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(c, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise LayerError(f"path component {_show(prefix)!r} is a symlink") from None
                    if not is_whiteout(st, c, dir_fd=fd):
                        raise LayerError(f"path component {_show(prefix)!r} is not a directory") from None
                    if not create:
                        raise _Missing from None
                    os.unlink(c, dir_fd=fd)
                    nfd = self._implicit(fd, prefix, whiteout=True)
                if fd != self.root:
                    os.close(fd)
                fd = nfd
        except BaseException as e:
            if fd != self.root:
                os.close(fd)
            if isinstance(e, _Missing):
                return None
            raise
        self._uncache()
        self.cache = (comps, fd)
        return fd

    def _implicit(self, pfd: int, prefix: tuple[bytes, ...], whiteout: bool) -> int:
        """Create a directory the layer implies: with the metadata of the lower dir it shadows, if any."""
        lower = None if whiteout else self._lower_dir(prefix)
        os.mkdir(prefix[-1], 0o700, dir_fd=pfd)
        fd = os.open(prefix[-1], _DIRFLAGS, dir_fd=pfd)
        if whiteout:
            self.fmt.set_opaque(fd)
            self.opaque.add(prefix)
        if lower is None:
            self.dirmeta[prefix] = (0o755, 0)
            return fd
        st = os.lstat(lower)
        xattrs = {}
        for name in os.listxattr(lower, follow_symlinks=False):
            if _keep_xattr(name) or name == XATTR_STAT:
                xattrs[name] = os.getxattr(lower, name, follow_symlinks=False)
        rec = xattrs.pop(XATTR_STAT, None)
        uid, gid = _parse_ids(rec, lower) if rec else disk_owner(st)
        self._own(prefix[:-1], pfd, prefix[-1], uid, gid, fd=fd)
        for name, value in xattrs.items():
            os.setxattr(fd, name, value)
        self.dirmeta[prefix] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        return fd

    def _lower_dir(self, prefix: tuple[bytes, ...]) -> bytes | None:
        """Path of the topmost lower dir at `prefix` in the merged view, None if absent; refuses non-dirs."""
        if any(prefix[:i] in self.opaque for i in range(len(prefix))):
            return None
        active = self.lowers
        found = None
        for i in range(len(prefix)):
            sub = b"/" + b"/".join(prefix[: i + 1])
            found, nxt = None, []
            for layer in active:
                try:
                    st = os.lstat(layer + sub)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if is_whiteout(st, layer + sub):
                    break
                if not stat.S_ISDIR(st.st_mode):
                    if found is None:
                        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                        raise LayerError(f"path component {_show(prefix[: i + 1])!r} is {what} in a lower layer")
                    break
                if found is None:
                    found = layer + sub
                nxt.append(layer)
                if is_opaque(layer + sub):
                    break
            if found is None:
                return None
            active = nxt
        return found

    # ----- entries

    def _own(
        self,
        pcomps: tuple[bytes, ...],
        pfd: int,
        name: bytes,
        uid: int,
        gid: int,
        fd: int | None = None,
        fresh: bool = True,
    ) -> None:
        rec = self.owner.own(uid, gid, pfd=pfd, name=name, fd=fd, fresh=fresh)
        if rec is not None:
            self.lrec.setdefault(pcomps, {})[name] = rec
        elif pcomps in self.lrec:
            self.lrec[pcomps].pop(name, None)

    def _clear(self, pfd: int, comps: tuple[bytes, ...], want_dir: bool) -> str:
        """Make room for a new entry: returns 'absent', 'dir' (kept for a dir) or 'whiteout' (removed)."""
        name = comps[-1]
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return "absent"
        if stat.S_ISDIR(st.st_mode):
            if want_dir:
                return "dir"
            self._uncache_under(comps)
            shutil.rmtree(name, dir_fd=pfd)
            return "absent"
        was_whiteout = is_whiteout(st, name, dir_fd=pfd)
        os.unlink(name, dir_fd=pfd)
        self.lrec.get(comps[:-1], {}).pop(name, None)
        return "whiteout" if was_whiteout else "absent"

    def _uncache_under(self, comps: tuple[bytes, ...]) -> None:
        """Forget what was under a removed directory (the cached fd too, but never its parent's)."""
        n = len(comps)
        if self.cache is not None and self.cache[0][:n] == comps:
            self._uncache()
        for table in (self.lrec, self.dirmeta):
            for key in [k for k in table if k[:n] == comps]:
                del table[key]
        self.opaque = {k for k in self.opaque if k[:n] != comps}

    def run(self, stream: BinaryIO) -> None:
        counted = _Counted(stream, self.limits.max_bytes)
        try:
            # tarfile's stream buffer is re-sliced on every header read: keep it small (64 KiB)
            tf = tarfile.open(
                fileobj=counted, mode="r|", bufsize=1 << 16, tarinfo=_Info, encoding="utf-8", errors="surrogateescape"
            )
        except tarfile.ReadError as e:
            if str(e) == "empty file":
                return
            raise LayerError(f"layer: not a tar archive ({e})") from None
        except (tarfile.TarError, ValueError, EOFError) as e:  # the first header is read right away
            raise LayerError(f"layer: corrupt tar ({e})") from None
        while True:
            try:
                ti = tf.next()
            except (tarfile.TarError, ValueError, EOFError) as e:  # ValueError: e.g. a bad PAX sparse map
                raise LayerError(f"layer: corrupt tar ({e})") from None
            if ti is None:
                break
            tf.members.clear()  # type: ignore[attr-defined]
            self.entries += 1
            if self.entries > self.limits.max_entries:
                raise LayerError(f"layer: more than {self.limits.max_entries} entries (RBUILD_MAX_LAYER_ENTRIES)")
            try:
                self.entry(tf, ti)
            except LayerError as e:
                msg = str(e)
                raise LayerError(msg if msg.startswith("layer") else f"layer entry {ti.name!r}: {msg}") from None
            except OSError as e:
                raise LayerError(f"layer entry {ti.name!r}: {e.strerror or e}") from None
            except (ValueError, OverflowError) as e:  # a NUL in a PAX name, a number no system call takes
                raise LayerError(f"layer entry {ti.name!r}: {e}") from None
        while counted.read(CHUNK):  # the rest of the stream, so that digests get verified
            pass
        self.finish()

    def entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        comps = _split(ti.name)
        _check_numbers(ti)
        if ti.isreg():
            self.total += ti.size
            if self.total > self.limits.max_bytes:
                raise LayerError(
                    f"data exceeds the layer limit of {self.limits.max_bytes} bytes (RBUILD_MAX_LAYER_BYTES)"
                )
        if not comps:
            if not ti.isdir():
                raise LayerError("the layer root must be a directory")
            self._meta_root(ti)
            return
        if len(comps) > MAX_DEPTH:
            raise LayerError(f"path deeper than {MAX_DEPTH} directories")
        if self.whiteouts and any(c.startswith(_WH) for c in comps[:-1]):
            raise LayerError("a whiteout name (.wh.) used as a directory")
        base = comps[-1]
        if self.whiteouts and base.startswith(_WH):
            self._whiteout(comps, ti)
            return
        pfd = self.parent(comps[:-1])
        assert pfd is not None
        if ti.isdir():
            state = self._clear(pfd, comps, want_dir=True)
            if state != "dir":
                os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base, _DIRFLAGS, dir_fd=pfd)
            try:
                if state == "whiteout":
                    self.fmt.set_opaque(fd)
                    self.opaque.add(comps)
                self._own(comps[:-1], pfd, base, ti.uid, ti.gid, fd=fd, fresh=state != "dir")
                self._xattrs(fd, ti)
            finally:
                os.close(fd)
            self.dirmeta[comps] = (ti.mode & 0o7777, _mtime_ns(ti))
        elif ti.islnk():
            self._hardlink(comps, ti)
        elif ti.isreg():
            self._file(tf, ti, pfd, comps)
        else:
            self._clear(pfd, comps, want_dir=False)
            if ti.issym():
                os.symlink(os.fsencode(ti.linkname), base, dir_fd=pfd)
                self._own(comps[:-1], pfd, base, ti.uid, ti.gid)
                os.utime(base, ns=(_mtime_ns(ti),) * 2, dir_fd=pfd, follow_symlinks=False)
            elif ti.isfifo():
                os.mkfifo(base, 0o600, dir_fd=pfd)
                self._special_meta(pfd, comps, ti)
            elif ti.ischr() or ti.isblk():
                fd = os.open(
                    base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd
                )
                try:
                    kind = b"c" if ti.ischr() else b"b"
                    os.setxattr(fd, XATTR_DEV, b"%s:%d:%d" % (kind, ti.devmajor, ti.devminor))
                    self._meta_fd(fd, pfd, comps, ti)
                finally:
                    os.close(fd)
            else:
                raise LayerError(f"unsupported entry type {ti.type!r}")

    def _file(self, tf: tarfile.TarFile, ti: tarfile.TarInfo, pfd: int, comps: tuple[bytes, ...]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(comps[-1], flags, 0o600, dir_fd=pfd)
        except FileExistsError:  # rare: make room, never write through what is there
            self._clear(pfd, comps, want_dir=False)
            fd = os.open(comps[-1], flags, 0o600, dir_fd=pfd)
        try:
            src: BinaryIO = tf.fileobj  # type: ignore[assignment]
            sparse: list[tuple[int, int]] | None = ti.sparse  # type: ignore[assignment]
            if sparse is not None:
                room = tf.offset - ti.offset_data
                for offset, size in sparse:
                    size = min(size, room)
                    room -= size
                    os.lseek(fd, offset, os.SEEK_SET)
                    _copy(src, fd, size)
                os.ftruncate(fd, ti.size)
            else:
                _copy(src, fd, ti.size)
            self._meta_fd(fd, pfd, comps, ti)
        finally:
            os.close(fd)

    def _meta_fd(self, fd: int, pfd: int, comps: tuple[bytes, ...], ti: tarfile.TarInfo) -> None:
        """Owner first (chown clears setuid bits and capabilities), then mode, xattrs, mtime."""
        self._own(comps[:-1], pfd, comps[-1], ti.uid, ti.gid, fd=fd)
        os.fchmod(fd, ti.mode & 0o7777)
        self._xattrs(fd, ti)
        os.utime(fd, ns=(_mtime_ns(ti),) * 2)

    def _special_meta(self, pfd: int, comps: tuple[bytes, ...], ti: tarfile.TarInfo) -> None:
        self._own(comps[:-1], pfd, comps[-1], ti.uid, ti.gid)
        os.chmod(comps[-1], ti.mode & 0o7777, dir_fd=pfd)
        os.utime(comps[-1], ns=(_mtime_ns(ti),) * 2, dir_fd=pfd, follow_symlinks=False)

    def _meta_root(self, ti: tarfile.TarInfo) -> None:
        self.owner.own(ti.uid, ti.gid, pfd=-1, name=b"", fd=self.root, fresh=False)
        self._xattrs(self.root, ti)
        self.dirmeta[()] = (ti.mode & 0o7777, _mtime_ns(ti))

    @staticmethod
    def _xattrs(fd: int, ti: tarfile.TarInfo) -> None:
        for key, value in sorted(ti.pax_headers.items()):
            if key.startswith("SCHILY.xattr.") and _keep_xattr(key[13:]):
                os.setxattr(fd, key[13:], value.encode("utf-8", "surrogateescape"))

    def _whiteout(self, comps: tuple[bytes, ...], ti: tarfile.TarInfo) -> None:
        base = comps[-1]
        if base == _OPQ:
            fd = self.parent(comps[:-1])
            assert fd is not None
            self.fmt.set_opaque(fd)
            self.opaque.add(comps[:-1])
            return
        if base.startswith(_WH + _WH):  # aufs metadata (.wh..wh.plnk etc.): nothing to apply
            return
        name = base[len(_WH) :]
        if name in (b"", b".", b".."):
            raise LayerError("whiteout names no entry in its directory")
        pfd = self.parent(comps[:-1])
        assert pfd is not None
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            self.fmt.make_whiteout(name, dir_fd=pfd)
            self._special_meta(pfd, comps[:-1] + (name,), ti)
            return
        if stat.S_ISDIR(st.st_mode):  # added by this layer: stays, but hides what lower layers had
            fd = os.open(name, _DIRFLAGS, dir_fd=pfd)
            try:
                self.fmt.set_opaque(fd)
            finally:
                os.close(fd)
            self.opaque.add(comps[:-1] + (name,))

    def _hardlink(self, comps: tuple[bytes, ...], ti: tarfile.TarInfo) -> None:
        tcomps = _split(ti.linkname, "link target")
        if not tcomps:
            raise LayerError("hard link to the layer root")
        tparent = self.parent(tcomps[:-1], create=False)
        tst = None
        if tparent is not None:
            tfd = os.dup(tparent)
            try:
                tst = os.stat(tcomps[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
        if tst is None or is_whiteout(tst, tcomps[-1], dir_fd=tfd):
            if tparent is not None:
                os.close(tfd)
            raise LayerError(f"hard link target {_show(tcomps)!r} is not in this layer")
        try:
            if stat.S_ISDIR(tst.st_mode):
                raise LayerError(f"hard link target {_show(tcomps)!r} is a directory")
            pfd = self.parent(comps[:-1])
            assert pfd is not None
            try:
                st = os.stat(comps[-1], dir_fd=pfd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                    return
            except FileNotFoundError:
                pass
            self._clear(pfd, comps, want_dir=False)
            os.link(tcomps[-1], comps[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            rec = self.lrec.get(tcomps[:-1], {}).get(tcomps[-1])
            if rec is not None:
                self.lrec.setdefault(comps[:-1], {})[comps[-1]] = rec
        finally:
            os.close(tfd)

    def finish(self) -> None:
        """Owner records of non-xattr-capable children, then directory modes and mtimes."""
        self._uncache()
        for pcomps, recs in self.lrec.items():
            fd = self.parent(pcomps, create=False)
            if fd is None:
                continue
            if recs:
                os.setxattr(fd, XATTR_LSTAT, _fmt_lstat(fd, recs))
        for comps, (mode, mtime) in self.dirmeta.items():
            fd = self.parent(comps, create=False)
            if fd is None:
                continue
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime, mtime))
        self._uncache()


class _ArchiveUnpacker(_Unpacker):
    """ADD's semantics (docker's Untar) with the layer unpacker's parser, checks and limits: entries land in
    an existing directory and replace what is there (directories merge); symlinks already there are
    followed, never out of it; `.wh.` names are plain names; device nodes are skipped; the archive's root
    entry leaves the destination alone; leading `/` is dropped; `owner` (ADD --chown) replaces the
    archive's owners."""

    whiteouts = False

    def __init__(self, dest: str, owner: tuple[int, int] | None, ownership: Ownership) -> None:
        super().__init__(dest, (), ownership, UnpackLimits(), FORMAT)  # a tree: it writes no whiteouts
        self.dest = dest
        self.forced = owner

    def parent(self, comps: tuple[bytes, ...], create: bool = True) -> int | None:
        if not comps:
            return self.root
        if self.cache is not None and self.cache[0] == comps:
            return self.cache[1]
        from rootless.kernel.fspath import secure_join

        try:
            path = secure_join(self.dest, os.fsdecode(b"/".join(comps)))
        except RbuildError as e:  # a symlink loop
            raise LayerError(str(e)) from None
        try:
            if create:
                os.makedirs(path, exist_ok=True)
            fd = os.open(path, _DIRFLAGS)
        except (FileNotFoundError, NotADirectoryError, FileExistsError):
            if not create:
                return None
            raise LayerError(f"path component {_show(comps)!r} is not a directory") from None
        self._uncache()
        self.cache = (comps, fd)
        return fd

    def entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        ti.name = ti.name.lstrip("/")
        if ti.islnk():
            ti.linkname = ti.linkname.lstrip("/")
        if not _split(ti.name) or ti.ischr() or ti.isblk():
            _check_numbers(ti)
            return
        if self.forced is not None:
            ti.uid, ti.gid = self.forced
        super().entry(tf, ti)


def unpack_archive(
    path: str, dest: str, owner: tuple[int, int] | None, what: str, ownership: Ownership = Ownership.MAPPED
) -> None:
    """Unpack a tar archive (plain, gzip, zstd, bzip2 or xz) into the existing directory `dest`, as ADD does,
    through the layer unpacker; one RbuildError naming `what` and the archive for anything wrong with it.
    `ownership`: the build's (owners the namespace cannot map are recorded either way)."""
    import lzma

    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        stream: BinaryIO
        if magic.startswith(b"BZh"):
            import bz2

            stream = cast(BinaryIO, bz2.open(path, "rb"))
        elif magic.startswith(b"\xfd7zXZ\x00"):
            stream = cast(BinaryIO, lzma.open(path, "rb"))
        else:
            stream = open_blob(path, name=name)
    except (OSError, RbuildError) as e:
        raise RbuildError(f"{what}: cannot read archive {name}: {getattr(e, 'strerror', None) or e}") from None
    u = _ArchiveUnpacker(dest, owner, ownership)
    try:
        with stream:
            u.run(stream)
    except (LayerError, EOFError, ValueError, OverflowError, OSError, lzma.LZMAError) as e:
        if isinstance(e, OSError) and e.errno:  # a real I/O error, not a damaged stream
            raise
        cause = str(e).removeprefix("layer: ")
        raise RbuildError(f"{what}: archive {name} is damaged: {cause}") from None
    finally:
        u.close()


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    m = ti.mtime
    return m * 1_000_000_000 if isinstance(m, int) else int(m * 1_000_000_000)


def _copy(src: BinaryIO, fd: int, size: int) -> None:
    read = src.read
    while size > 0:
        data = read(min(size, CHUNK))
        if not data:
            raise LayerError("unexpected end of data (truncated layer)")
        size -= len(data)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


_MAX_ID = 2**32 - 2
_MAX_MTIME = 2**62 // 10**9


def _check_numbers(ti: tarfile.TarInfo) -> None:
    """Header numbers a hostile layer may push out of range (PAX and base-256 allow any size)."""
    if not (0 <= ti.uid <= _MAX_ID and 0 <= ti.gid <= _MAX_ID):
        raise LayerError(f"owner {ti.uid}:{ti.gid} out of range")
    if not (isinstance(ti.mtime, int | float) and math.isfinite(ti.mtime) and abs(ti.mtime) <= _MAX_MTIME):
        raise LayerError(f"modification time {ti.mtime!r} out of range")
    if (ti.ischr() or ti.isblk()) and not (0 <= ti.devmajor <= 0o7777777 and 0 <= ti.devminor <= 0o7777777):
        raise LayerError(f"device number {ti.devmajor}:{ti.devminor} out of range")


def unpack(
    stream: BinaryIO,
    dest: str,
    *,
    lowers: Sequence[str] = (),
    ownership: Ownership = Ownership.MAPPED,
    limits: UnpackLimits | None = None,
    fmt: LayerFormat = FORMAT,
) -> None:
    """Unpack an uncompressed tar layer into `dest` (an existing empty dir) as a layer dir in `fmt` (the store's).

    Runs as uid 0 of the user namespace. `lowers` are the image's lower layer dirs, top first, so that a
    symlink planted by an earlier layer is seen and never followed. With `Ownership.RECORDED` (no subuid
    range) foreign owners are recorded in xattrs instead of chowned; so are ids the namespace does not map.
    """
    u = _Unpacker(dest, lowers, ownership, limits or UnpackLimits(), fmt)
    try:
        u.run(stream)
    except OSError as e:
        raise LayerError(f"layer: {e.strerror or e}") from None
    except (ValueError, OverflowError) as e:
        raise LayerError(f"layer: {e}") from None
    finally:
        u.close()


# --------------------------------------------------------------------------------------------- normalize


def normalize(
    layer_dir: str,
    *,
    set_mtime: int | None = None,
    clamp_mtime: int | None = None,
    run_lowers: Sequence[str] | None = None,
    sealed: bool = False,
    new_owner: tuple[int, int] | None = None,
) -> None:
    """Make an overlay upper dir a store layer dir: drop overlay-private xattrs, apply mtime policy.

    `set_mtime` (--timestamp) gives every entry that mtime; `clamp_mtime` (SOURCE_DATE_EPOCH) lowers
    newer mtimes to it. Symlinks are never followed. `run_lowers` (top first) is given for an upper a
    RUN wrote: then rbuild's own records in it are checked against those lowers (see `_Scrub`), unless
    `sealed`: a single-uid RUN whose every xattr write went through the supervisor (rootless.sandbox.notify),
    which refuses ``user.rbuild.*`` to the RUN, so each record there came from a lower or the supervisor.
    `new_owner`: that RUN's user, recorded as the owner of each entry it made (not in `run_lowers`) that
    has no record of its own (the RUN ran as the one mapped uid, emulating that user).
    """
    scrub = _Scrub(run_lowers) if run_lowers is not None and not sealed else None
    root = os.open(layer_dir, _DIRFLAGS)
    try:
        if new_owner is not None and new_owner != (0, 0) and run_lowers is not None:
            _own_new(root, [os.fsencode(os.path.abspath(p)) for p in run_lowers], new_owner)
        _depth_first(_normalize_dir(root, set_mtime, clamp_mtime, scrub, (), False))
        if scrub is not None:
            scrub.finish(root)
    except OSError as e:
        raise LayerError(f"layer {layer_dir}: {e.strerror or e}") from None
    finally:
        os.close(root)


def _ino(dfd: int, name: bytes) -> int | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return None


def _own_new(root: int, lowers: list[bytes], owner: tuple[int, int]) -> None:
    """Record `owner` on each entry below `root` that is not in the merged `lowers` and has no owner record."""
    stack: list[tuple[int, tuple[bytes, ...], bool]] = [(os.dup(root), (), False)]
    while stack:
        dfd, comps, hidden = stack.pop()
        try:
            opaque = hidden or is_opaque(dfd)
            lrec = _parse_lstat(_getxattr(dfd, XATTR_LSTAT) or b"", b"/".join(comps))
            for name in os.listdir(dfd):
                bname = os.fsencode(name)
                st = os.stat(bname, dir_fd=dfd, follow_symlinks=False)
                if is_whiteout(st, bname, dir_fd=dfd):
                    continue
                sub = comps + (bname,)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((os.open(bname, _DIRFLAGS, dir_fd=dfd), sub, opaque))
                if not opaque and _merged_entry(lowers, sub) is not None:
                    continue
                if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):  # no chown: it would clear set-id bits
                    fd = _open_meta(dfd, bname)
                    try:
                        if _getxattr(fd, XATTR_STAT) is None:
                            os.setxattr(fd, XATTR_STAT, b"%d:%d" % owner)
                    finally:
                        os.close(fd)
                elif bname not in lrec or lrec[bname][2] != st.st_ino:
                    lrec[bname] = (*owner, st.st_ino)
                    live = {n: (u, g) for n, (u, g, ino) in lrec.items() if _ino(dfd, n) == ino}
                    os.setxattr(dfd, XATTR_LSTAT, _fmt_lstat(dfd, live))
        finally:
            os.close(dfd)


_Ref = tuple[int, int, int, dict[str, bytes]]  # an entry's file type, owner and rbuild records


def _records(target: int | bytes, follow_symlinks: bool = True) -> dict[str, bytes]:
    """The user.rbuild.* xattrs of a file, directory or (not following it) path."""
    return {
        n: os.getxattr(target, n, follow_symlinks=follow_symlinks)
        for n in os.listxattr(target, follow_symlinks=follow_symlinks)
        if n.startswith("user.rbuild.") and n not in lformat.MARKERS
    }


class _Scrub:
    """rbuild's records in the upper dir of a RUN, which can set ``user.*`` xattrs.

    A record is kept only where the merged lowers hold the same record at the same path (overlay copy-up
    brought it along), on an entry of the same type, and for an owner record only while the entry's
    owner is unchanged (a chown since makes it stale). rbuild writes no record into a RUN's upper before
    it runs (WORKDIR's directories belong to the RUN's user, which the namespace maps). So a RUN's
    output never claims more for a path than its lowers did: it cannot forge a device or an owner, nor
    move a valid record to another file; what it can do to a recorded entry is what it could do to a
    real one (chmod, write, delete). ``user.rbuild.lstat`` names children by inode number, which nothing
    a RUN makes can match: it is always removed. A hard-linked file keeps what any of its names keeps.
    """

    def __init__(self, lowers: Sequence[str]) -> None:
        self.lowers = [os.fsencode(os.path.abspath(p)) for p in lowers]
        self.links: dict[tuple[int, int], tuple[tuple[bytes, ...], set[str]]] = {}

    def scrub(self, fd: int, comps: tuple[bytes, ...], st: os.stat_result, hidden: bool) -> None:
        """Check the records of the upper's entry `comps` (open as fd); `hidden`: under an opaque dir."""
        recs = _records(fd)
        if not recs:
            return
        ref = None
        lower = None if hidden else _merged_entry(self.lowers, comps)
        if lower is not None:
            lst = os.lstat(lower)
            ref = (stat.S_IFMT(lst.st_mode), lst.st_uid, lst.st_gid, _records(lower, follow_symlinks=False))
        good = {n for n, v in recs.items() if _as_before(n, v, st, ref)}
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:  # decided once every name was seen (`finish`)
            key = (st.st_dev, st.st_ino)
            seen = self.links.get(key)
            self.links[key] = (comps, good | (seen[1] if seen else set()))
            return
        for n in recs.keys() - good:
            os.removexattr(fd, n)

    def finish(self, root: int) -> None:
        """Remove, from each hard-linked file, the records none of its names kept."""
        for (dev, ino), (comps, good) in self.links.items():
            fd = root
            try:
                for c in comps[:-1]:
                    nfd = os.open(c, _DIRFLAGS, dir_fd=fd)
                    if fd != root:
                        os.close(fd)
                    fd = nfd
                nfd = _open_meta(fd, comps[-1])
                if fd != root:
                    os.close(fd)
                fd = nfd
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    for n in _records(fd).keys() - good:
                        os.removexattr(fd, n)
            finally:
                if fd != root:
                    os.close(fd)


def _as_before(name: str, value: bytes, st: os.stat_result, ref: _Ref | None) -> bool:
    """The record `name`=`value` on an entry like st is the one the lower entry `ref` had."""
    if ref is None or ref[0] != stat.S_IFMT(st.st_mode) or ref[3].get(name) != value:
        return False
    if name == XATTR_STAT:
        return (st.st_uid, st.st_gid) == (ref[1], ref[2])  # chowned since: the record no longer tells the owner
    return name == XATTR_DEV and stat.S_ISREG(st.st_mode)


def holds_records(top: str) -> bool:
    """Some entry of layer dir `top` has an owner or device record (stops at the first one it finds).

    A single-uid RUN over layers without any answers stat without a look at the path (sandbox.notify).
    """
    try:
        if any(n.startswith("user.rbuild.") for n in os.listxattr(top)):
            return True
        with os.scandir(top) as it:
            entries = list(it)
    except OSError:
        return True  # unreadable: assume records, the slow path is always right
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            if holds_records(e.path):
                return True
        elif e.is_file(follow_symlinks=False):
            try:
                if any(n.startswith("user.rbuild.") for n in os.listxattr(e.path, follow_symlinks=False)):
                    return True
            except OSError:
                return True
    return False


def in_lowers(lowers: Sequence[str], path: str) -> bool:
    """`path` (a container path) names an entry in the merged view of `lowers` (top first)."""
    comps = tuple(os.fsencode(c) for c in path.split("/") if c)
    return _merged_entry([os.fsencode(os.path.abspath(p)) for p in lowers], comps) is not None


def _merged_entry(lowers: Sequence[bytes], comps: tuple[bytes, ...]) -> bytes | None:
    """Path of the entry at `comps` in the merged view of `lowers` (top first), None where there is none.

    Overlay's lookup: the topmost layer holding the name wins; a whiteout or non-directory hides the
    layers below, an opaque directory hides deeper ones. Only verified directories are walked through.
    """
    if not comps:
        return lowers[0] if lowers else None
    active = list(lowers)
    for i in range(len(comps)):
        sub = b"/" + b"/".join(comps[: i + 1])
        last = i == len(comps) - 1
        found: bytes | None = None
        nxt = []
        for layer in active:
            try:
                st = os.lstat(layer + sub)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if is_whiteout(st, layer + sub):
                break
            if found is None:
                found = layer + sub
                if last or not stat.S_ISDIR(st.st_mode):
                    break
            elif not stat.S_ISDIR(st.st_mode):
                break
            nxt.append(layer)
            if is_opaque(layer + sub):
                break
        if found is None or last:
            return found
        if not nxt:  # a non-directory there: nothing below it
            return None
        active = nxt
    return None


def _depth_first(top: Iterator[Any]) -> None:
    """Run nested per-directory generators depth first: no Python recursion limit on tree depth.

    Each generator yields the generator of a subdirectory, which runs to its end before the parent
    resumes (and closes the subdirectory's fd).
    """
    stack = [top]
    try:
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
            else:
                stack.append(child)
    finally:
        for gen in reversed(stack):
            gen.close()


def _normalize_dir(
    dfd: int, set_mtime: int | None, clamp: int | None, scrub: _Scrub | None, comps: tuple[bytes, ...], hidden: bool
) -> Iterator[Any]:
    """`hidden`: an opaque directory above hides the lowers (nothing here was copied up)."""
    opaque = False
    for xname in os.listxattr(dfd):
        if xname in (lformat.OVERLAY_OPAQUE, lformat.XATTR_OPAQUE) and os.getxattr(dfd, xname) == b"y":
            opaque = True
        elif xname.startswith("user.overlay."):
            os.removexattr(dfd, xname)
    if scrub is not None:
        scrub.scrub(dfd, comps, os.fstat(dfd), hidden or opaque)  # an opaque dir is new, not a copy
    with os.scandir(dfd) as it:
        entries = list(it)
    for e in entries:
        st = e.stat(follow_symlinks=False)
        name = os.fsencode(e.name)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(e.name, _DIRFLAGS, dir_fd=dfd)
            try:
                yield _normalize_dir(fd, set_mtime, clamp, scrub, comps + (name,), hidden or opaque)
            finally:
                os.close(fd)
            continue
        if stat.S_ISREG(st.st_mode):
            fd = _open_meta(dfd, name)
            try:
                for xname in os.listxattr(fd):
                    if xname.startswith("user.overlay."):
                        os.removexattr(fd, xname)
                if scrub is not None:
                    scrub.scrub(fd, comps + (name,), st, hidden or opaque)
            finally:
                os.close(fd)
        _set_time(dfd, e.name, st, set_mtime, clamp)
    st = os.fstat(dfd)
    ns = _new_mtime(st.st_mtime_ns, set_mtime, clamp)
    if ns is not None:
        os.utime(dfd, ns=(ns, ns))


def _new_mtime(ns: int, set_mtime: int | None, clamp: int | None) -> int | None:
    if set_mtime is not None:
        return set_mtime * 1_000_000_000
    if clamp is not None and ns > clamp * 1_000_000_000:
        return clamp * 1_000_000_000
    return None


def _set_time(dfd: int, name: str, st: os.stat_result, set_mtime: int | None, clamp: int | None) -> None:
    ns = _new_mtime(st.st_mtime_ns, set_mtime, clamp)
    if ns is not None:
        os.utime(name, ns=(ns, ns), dir_fd=dfd, follow_symlinks=False)


# --------------------------------------------------------------------------------------------- write_tar

_ZEROS = bytes(CHUNK)
_MAX_OCTAL7 = 0o7777777
_MAX_OCTAL11 = 0o77777777777


class _Sink:
    """The tar stream, cut into blocks of exactly CHUNK bytes: hashed, and passed to `out.write`.

    File data is read straight into a block buffer, so each byte is copied once from the kernel. Two
    buffers alternate: a worker thread hashes (and writes, compresses) one while the walk fills the
    other; hashlib, ISA-L and zstd release the GIL, so reading overlaps hashing on two cores.
    `out.write` gets a memoryview that is only valid during the call.
    """

    def __init__(self, out: BinaryIO | None) -> None:
        self.bufs = (bytearray(CHUNK), bytearray(CHUNK))
        self.cur = 0
        self.mv = memoryview(self.bufs[0])
        self.pos = 0
        self.size = 0
        self.sha = hashlib.sha256()
        self.write = out.write if out is not None else None
        self.pool: ThreadPoolExecutor | None = None
        self.pending: Future[None] | None = None

    def _consume(self, view: memoryview) -> None:
        self.sha.update(view)
        if self.write is not None:
            self.write(view)

    def flush(self) -> None:
        view = self.mv[: self.pos]
        self.size += self.pos
        self.pos = 0
        if self.pending is not None:
            self.pending.result()
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor  # lazily: keeps `import layers` cheap

            self.pool = ThreadPoolExecutor(1, thread_name_prefix="rbuild-tar")
        self.pending = self.pool.submit(self._consume, view)
        self.cur ^= 1
        self.mv = memoryview(self.bufs[self.cur])

    def finish(self) -> None:
        """Flush the last block and wait for the worker (which re-raises its error, if any)."""
        if self.pool is None:  # the whole stream fit in one block: no thread needed
            self.size += self.pos
            self._consume(self.mv[: self.pos])
            self.pos = 0
            return
        self.flush()
        self.close()

    def close(self) -> None:
        try:
            if self.pending is not None:
                self.pending.result()
        finally:
            self.pending = None
            if self.pool is not None:
                self.pool.shutdown()

    def put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            k = min(len(view), CHUNK - self.pos)
            self.mv[self.pos : self.pos + k] = view[:k]
            self.pos += k
            view = view[k:]
            if self.pos == CHUNK:
                self.flush()

    def file(self, fd: int, size: int, path: bytes) -> None:
        left = size
        while left:
            k = min(left, CHUNK - self.pos)
            n = os.readv(fd, [self.mv[self.pos : self.pos + k]])
            if not n:
                raise LayerError(f"layer entry {os.fsdecode(path)!r}: file shrank while being read")
            self.pos += n
            left -= n
            if self.pos == CHUNK:
                self.flush()
        if size % 512:
            self.put(_ZEROS[: 512 - size % 512])


def _pax_record(key: bytes, value: bytes) -> bytes:
    n = len(key) + len(value) + 3
    total = n + len(str(n))
    total = n + len(str(total))
    return b"%d %s=%s\n" % (total, key, value)


def _ustar(
    name: bytes,
    prefix: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes,
    dev: tuple[int, int],
) -> bytes:
    buf = b"".join(
        (
            name.ljust(100, b"\0"),
            b"%07o\0" % mode,
            b"%07o\0" % uid,
            b"%07o\0" % gid,
            b"%011o\0" % size,
            b"%011o\0" % mtime,
            b"        ",
            typeflag,
            linkname.ljust(100, b"\0"),
            b"ustar\x0000",
            _ZEROS[:64],
            b"%07o\0" % dev[0],
            b"%07o\0" % dev[1],
            prefix.ljust(155, b"\0"),
            _ZEROS[:12],
        )
    )
    return buf[:148] + b"%06o\0 " % sum(buf) + buf[156:]


def _header(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes = b"",
    dev: tuple[int, int] = (0, 0),
    xattrs: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """One entry's header: ustar (name split into prefix/name when it fits), PAX only when needed."""
    pax: list[tuple[bytes, bytes]] = [(b"SCHILY.xattr." + k, v) for k, v in xattrs]
    prefix, base = b"", name
    if len(name) > 100:
        cut = name.find(b"/")  # the shortest prefix that leaves a name of at most 100 bytes
        while 0 <= cut <= 155 and len(name) - cut - 1 > 100:
            cut = name.find(b"/", cut + 1)
        if 0 <= cut <= 155 and len(name) - cut - 1 > 0:
            prefix, base = name[:cut], name[cut + 1 :]
        else:
            pax.append((b"path", name))
            base = name[:100]
    if len(linkname) > 100:
        pax.append((b"linkpath", linkname))
        linkname = linkname[:100]
    if uid > _MAX_OCTAL7:
        pax.append((b"uid", b"%d" % uid))
        uid = 0
    if gid > _MAX_OCTAL7:
        pax.append((b"gid", b"%d" % gid))
        gid = 0
    if size > _MAX_OCTAL11:
        pax.append((b"size", b"%d" % size))
        size = 0
    if not 0 <= mtime <= _MAX_OCTAL11:
        pax.append((b"mtime", b"%d" % mtime))
        mtime = 0
    if max(dev) > _MAX_OCTAL7:
        raise LayerError(f"layer entry {os.fsdecode(name)!r}: device number too large for tar")
    head = _ustar(base, prefix, mode, uid, gid, size, mtime, typeflag, linkname, dev)
    if not pax:
        return head
    records = b"".join(_pax_record(k, v) for k, v in sorted(pax))
    pad = _ZEROS[: -len(records) % 512]
    return _ustar(b"././@PaxHeader", b"", 0, 0, 0, len(records), 0, b"x", b"", (0, 0)) + records + pad + head


def _xattrs_of(fd: int) -> dict[str, bytes]:
    return {n: os.getxattr(fd, n) for n in os.listxattr(fd)}


def _kept(xattrs: dict[str, bytes]) -> list[tuple[bytes, bytes]]:
    return sorted((k.encode("utf-8", "surrogateescape"), v) for k, v in xattrs.items() if _keep_xattr(k))


def _owner(st: os.stat_result, xattrs: dict[str, bytes], path: bytes) -> tuple[int, int]:
    rec = xattrs.get(XATTR_STAT)
    return _parse_ids(rec, path) if rec else disk_owner(st)


def _tar_dir(sink: _Sink, dfd: int, prefix: bytes, links: dict[tuple[int, int], bytes]) -> Iterator[Any]:
    lrec = _parse_lstat(_getxattr(dfd, XATTR_LSTAT) or b"", prefix.rstrip(b"/"))
    items = []
    with os.scandir(dfd) as it:
        for e in it:
            name = os.fsencode(e.name)
            st = e.stat(follow_symlinks=False)
            items.append((_WH + name if is_whiteout(st, name, dir_fd=dfd) else name, name, st))
    items.sort(key=lambda t: (t[0], t[1]))
    for out_name, name, st in items:
        path = prefix + out_name
        m = st.st_mode
        mtime = st.st_mtime_ns // 1_000_000_000
        perm = stat.S_IMODE(m)
        if stat.S_ISDIR(m):
            fd = os.open(name, _DIRFLAGS, dir_fd=dfd)
            try:
                xattrs = _xattrs_of(fd)
                uid, gid = _owner(st, xattrs, path)
                sink.put(_header(path + b"/", perm, uid, gid, 0, mtime, b"5", xattrs=_kept(xattrs)))
                if b"y" in (xattrs.get(lformat.OVERLAY_OPAQUE), xattrs.get(lformat.XATTR_OPAQUE)):
                    sink.put(_header(path + b"/" + _OPQ, perm, uid, gid, 0, mtime, b"0"))
                yield _tar_dir(sink, fd, path + b"/", links)
            finally:
                os.close(fd)
            continue
        if out_name != name:  # a whiteout, never a hard link: overlay shares one inode among its whiteouts
            uid, gid = _child_owner(lrec, name, st)
            sink.put(_header(path, perm, uid, gid, 0, mtime, b"0"))
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            uid, gid = _child_owner(lrec, name, st)
            if stat.S_ISREG(m):
                fd = _open_meta(dfd, name)
                try:
                    uid, gid = _owner(st, _xattrs_of(fd), path)
                finally:
                    os.close(fd)
            sink.put(_header(path, perm, uid, gid, 0, mtime, b"1", links[key]))
            continue
        if st.st_nlink > 1:
            links[key] = path
        if stat.S_ISREG(m):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                xattrs = _xattrs_of(fd)
                uid, gid = _owner(st, xattrs, path)
                dev = xattrs.get(XATTR_DEV)
                if dev is not None:
                    kind, major, minor = _parse_dev(dev, path)
                    sink.put(
                        _header(
                            path,
                            perm,
                            uid,
                            gid,
                            0,
                            mtime,
                            b"3" if kind == b"c" else b"4",
                            dev=(major, minor),
                            xattrs=_kept(xattrs),
                        )
                    )
                else:
                    sink.put(_header(path, perm, uid, gid, st.st_size, mtime, b"0", xattrs=_kept(xattrs)))
                    sink.file(fd, st.st_size, path)
            finally:
                os.close(fd)
            continue
        uid, gid = _child_owner(lrec, name, st)
        if stat.S_ISLNK(m):
            sink.put(_header(path, perm, uid, gid, 0, mtime, b"2", os.readlink(name, dir_fd=dfd)))
        elif stat.S_ISFIFO(m):
            sink.put(_header(path, perm, uid, gid, 0, mtime, b"6"))
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):  # a store written by real root
            sink.put(
                _header(
                    path,
                    perm,
                    uid,
                    gid,
                    0,
                    mtime,
                    b"3" if stat.S_ISCHR(m) else b"4",
                    dev=(os.major(st.st_rdev), os.minor(st.st_rdev)),
                )
            )
        # sockets have no tar form: left out, like every other builder does


def write_tar(layer_dir: str, out: BinaryIO | None) -> tuple[str, int]:
    """The layer's deterministic uncompressed tar: returns ("sha256:<hex>" diff_id, size); out=None hashes.

    A pure function of the directory: entries sorted by name, ustar headers with no uname/gname, PAX
    only for what ustar cannot hold, whole-second mtimes, owners as seen in the namespace (or from the
    user.rbuild.* records), whiteouts and opaque dirs as .wh. entries, no record padding after the end.
    """
    sink = _Sink(out)
    try:
        root = os.open(layer_dir, _DIRFLAGS)
        try:
            _depth_first(_tar_dir(sink, root, b"", {}))
            sink.put(_ZEROS[:1024])
            sink.finish()
        finally:
            os.close(root)
            sink.close()
    except OSError as e:
        raise LayerError(f"layer {layer_dir}: {e.strerror or e}") from None
    return "sha256:" + sink.sha.hexdigest(), sink.size


# --------------------------------------------------------------------------------------------- open_blob

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _GzipMembers(io.RawIOBase):
    """gzip members back to back, read as Go's compress/gzip reads them (what umoci, skopeo and containerd
    use): each member's CRC and length checked, and bytes after a member that do not start another
    member refused, zero padding included (zlib and Python's gzip module skip those)."""

    def __init__(self, raw: io.RawIOBase, what: str) -> None:
        self.raw, self.what = raw, what
        self.dec: Any = None
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        from isal import igzip_lib

        while True:
            if self.dec is None:  # between members
                while len(self.pending) < 2:
                    more = self.raw.read(CHUNK)
                    if not more:
                        break
                    self.pending += more
                if not self.pending:
                    return 0
                if self.pending[:2] != _GZIP_MAGIC:
                    raise LayerError(
                        f"blob {self.what}: corrupt compressed data: trailing bytes after the end of "
                        "the gzip stream (not another gzip member; Go's gzip reader refuses them)"
                    )
                self.dec = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
            if self.dec.eof:
                self.pending, self.dec = self.dec.unused_data, None
                continue
            data = b""
            if self.pending or self.dec.needs_input:
                data, self.pending = self.pending or self.raw.read(CHUNK), b""
                if not data:
                    raise LayerError(
                        f"blob {self.what}: corrupt compressed data: the gzip stream ends inside a member (truncated)"
                    )
            out = self.dec.decompress(data, len(b))
            if out:
                b[: len(out)] = out
                return len(out)


def _zstd_frames_end(f: IO[bytes], what: str) -> None:
    """Refuse anything after the last zstd frame of the blob `f` (seekable, read to its end) that is not a
    whole frame: zstandard's reader ignores a partial one at the end, Go's zstd reader refuses it. Walks
    the frame and block headers (no data)."""
    trailing = LayerError(
        f"blob {what}: corrupt compressed data: trailing bytes after the end of the zstd "
        "stream (not a whole zstd frame; Go's zstd reader refuses them)"
    )
    size = f.seek(0, io.SEEK_END)
    pos = 0

    def at(n: int) -> int:
        if pos + n > size:
            raise trailing
        f.seek(pos)
        return int.from_bytes(f.read(n), "little")

    while pos < size:
        magic = at(4)
        pos += 4
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
            pos += 4 + at(4)
            continue
        if magic != 0xFD2FB528:
            raise trailing
        fhd = at(1)
        single = fhd >> 5 & 1
        pos += 1 + (1 - single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
        while True:
            head = at(3)
            pos += 3 + (1 if head >> 1 & 3 == 1 else head >> 3)  # an RLE block holds one byte
            if head & 1:
                break
        pos += 4 * (fhd >> 2 & 1)  # the content checksum
    if pos != size:
        raise trailing


class _Blob(io.RawIOBase):
    """Decompressing reader that verifies the blob digest and the diff_id when it reaches the end.

    A thread decompresses up to 4 MiB ahead, so decompression overlaps the consumer's work (unpack).
    """

    def __init__(
        self, path: str, digest: str | None, diff_id: str | None, name: str | None, file: IO[bytes] | None = None
    ) -> None:
        self.path, self.digest, self.diff_id = path, digest, diff_id
        self.name = name or digest or path  # in error messages
        self.file: IO[bytes] = file if file is not None else open(path, "rb", buffering=0)
        magic = b""
        while len(magic) < 4 and (more := self.file.read(4 - len(magic))):  # a blob still arriving comes in pieces
            magic += more
        self.file.seek(0)
        try:  # the compressed bytes, verified against `digest` by the read that reaches their end
            self.raw = cast(io.RawIOBase, self.file) if digest is None else VerifyingReader(self.file, digest)
            self.out = Verifier(diff_id, what=f"blob {self.name}") if diff_id else None
        except RbuildError as e:  # a digest of an unknown algorithm
            self.file.close()
            raise LayerError(str(e)) from None
        self.inner: io.RawIOBase
        self.zstd = magic == _ZSTD_MAGIC
        if magic.startswith(_GZIP_MAGIC):
            self.inner = _GzipMembers(self.raw, self.name)
        elif self.zstd:
            import zstandard

            # zstandard reads from any object with read(), not only IO[bytes]; its reader is file-like, no RawIOBase
            reader = zstandard.ZstdDecompressor().stream_reader(
                cast(IO[bytes], self.raw), read_size=CHUNK, read_across_frames=True
            )
            self.inner = cast(io.RawIOBase, reader)
        else:
            self.inner = self.raw
        self.queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=4)
        self.thread: threading.Thread | None = None
        self.cur = memoryview(b"")
        self.done = False
        self.stop = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.thread is None:
            self.thread = threading.Thread(target=self._produce, name="rbuild-blob", daemon=True)
            self.thread.start()
        while not self.cur:
            if self.done:
                return 0
            item = self.queue.get()
            if isinstance(item, BaseException):
                self.done = True
                if isinstance(item, LayerError):
                    raise item
                if isinstance(item, BlobMismatch):  # the compressed bytes are not the blob named
                    raise LayerError(str(item))
                raise LayerError(f"blob {self.name}: corrupt compressed data ({item})")
            if not item:
                self.done = True
                return 0
            self.cur = memoryview(item)
        n = min(len(b), len(self.cur))
        b[:n] = self.cur[:n]
        self.cur = self.cur[n:]
        return n

    def _produce(self) -> None:
        """Decompress (and hash) ahead of the reader in a thread: ISA-L, zstd and hashlib release the GIL."""
        try:
            while not self.stop:
                data = self.inner.read(CHUNK)
                if not data:
                    self._verify()
                    self.queue.put(b"")
                    return
                if self.out is not None:
                    self.out.update(data)
                self.queue.put(data)
        except BaseException as e:  # handed to the reader, which raises it as a LayerError
            self.queue.put(e)

    def _verify(self) -> None:
        buf = bytearray(CHUNK)
        while self.raw.readinto(buf):
            pass
        if self.zstd:
            _zstd_frames_end(self.file, self.name)
        if self.out is not None and self.out.got != self.diff_id:
            raise LayerError(f"blob {self.name}: uncompressed content does not match diff_id {self.diff_id}")

    def close(self) -> None:
        self.stop = True
        while self.thread is not None and self.thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.05)
        if self.inner is not self.raw:
            self.inner.close()
        self.raw.close()
        super().close()


def open_blob(
    path: str,
    *,
    digest: str | None = None,
    diff_id: str | None = None,
    name: str | None = None,
    file: IO[bytes] | None = None,
) -> BinaryIO:
    """Reader of a layer blob's uncompressed tar: gzip (ISA-L), zstd or plain, told by magic bytes.

    With `digest` / `diff_id` the compressed / uncompressed bytes are hashed while streaming and
    checked at the end of the stream (LayerError on mismatch): read it to the end (`unpack` does).
    Bytes after the compressed stream are refused, as Go's readers refuse them. `name` (default: the
    digest, else the path) names the blob in errors. `file`: the blob's bytes from this seekable reader
    instead of `path` (a blob still arriving); closed with the reader.
    """
    try:
        return io.BufferedReader(_Blob(path, digest, diff_id, name, file), CHUNK)
    except OSError as e:
        raise LayerError(f"blob {path}: {e.strerror or e}") from None
