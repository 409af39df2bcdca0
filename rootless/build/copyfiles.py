"""COPY and ADD file operations: selecting sources (globs, .containerignore), hashing them for the
cache key (content, names, modes, resulting owners; never mtimes) and copying them into the tree.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rootless.errors import RbuildError
from rootless.frontend import globmatch
from rootless.kernel.fspath import inside, open_regular, secure_join
from rootless.layer.format import LayerFormat
from rootless.layer.ownership import Ownership

CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# .containerignore / .dockerignore


@dataclass
class IgnoreRule:
    matcher: globmatch.Pattern
    negate: bool
    pattern: str


_NOT_SLASH = ("!", "/")  # Go's [^/]
_NOT_NEWLINE = ("!", "\n")  # Go's `.`


def _compile(pattern: str) -> globmatch.Pattern | None:
    """docker's ignore patterns (Go filepath.Match plus `**`), anchored at the context root, matching the
    path or anything below it; None when a [...] class is not valid.  Linear-time, whatever the pattern."""
    out = globmatch.Pattern()
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):  # any number of leading directories, or none
                    i += 1
                    out.optional(2)
                    out.loop(_NOT_NEWLINE)
                    out.char(("=", "/"))
                else:
                    out.loop(_NOT_NEWLINE)
                continue
            out.loop(_NOT_SLASH)
        elif c == "?":
            out.char(_NOT_SLASH)
        elif c == "[":
            first = i + 2 if pattern[i + 1 : i + 2] in ("!", "^") else i + 1
            j = pattern.find("]", first + 1 if pattern[first : first + 1] == "]" else first)  # []] holds "]"
            if j < 0:  # no class: a literal "["
                out.char(("=", c))
            else:
                test = globmatch.parse_class(pattern[i + 1 : j])
                if test is None:
                    return None
                out.char(test)
                i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.char(("=", pattern[i]))
        else:
            out.char(("=", c))
        i += 1
    out.optional(2)  # what is below a matching directory matches too
    out.char(("=", "/"))
    out.loop(_NOT_NEWLINE)
    return out.end()


def load_ignore(context: str, containerfile: str | None) -> list[IgnoreRule]:
    """The rules of the ignore file next to the Containerfile (-f FILE.containerignore), else the context's.

    One that lies in the build context must stay there: a symlink out of it is refused, not followed
    (a file the user named outside the context is theirs to name)."""
    candidates = []
    if containerfile and containerfile != "-":
        candidates += [containerfile + ".containerignore", containerfile + ".dockerignore"]
    candidates += [os.path.join(context, ".containerignore"), os.path.join(context, ".dockerignore")]
    for path in candidates:
        if os.path.lexists(path):
            rules = _read_ignore(path, context)
            if rules is not None:
                return rules
    return []


def _read_ignore(path: str, context: str) -> list[IgnoreRule] | None:
    shown = os.path.relpath(path)
    if inside(os.path.dirname(os.path.abspath(path)), context) and not inside(path, context):
        raise RbuildError(
            f"{shown}: the ignore file is a symbolic link out of the build context; rbuild does not follow it"
        )
    try:
        with open_regular(path, shown) as f:  # a FIFO in the context must not hang the build
            data = f.read()
    except OSError:
        return None
    lines = data.decode("utf-8", errors="surrogateescape").splitlines()  # names are bytes, as the paths
    return patterns_to_rules(lines, lambda n: f"{shown}:{n}")


def patterns_to_rules(lines: list[str], where: Callable[[int], str]) -> list[IgnoreRule]:
    """Ignore-file lines (or COPY --exclude patterns) as rules; `!` lines re-include.  where(n): how an
    error names line n."""
    rules = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:].strip()
        norm = os.path.normpath(line).lstrip("/")
        if norm in ("", "."):
            continue
        matcher = _compile(norm)
        if matcher is None:
            raise RbuildError(
                f"{where(n)}: invalid pattern {line!r}: a [...] class is empty or has a range that runs backwards"
            )
        rules.append(IgnoreRule(matcher, negate, norm))
    return rules


def ignored(rel: str, rules: list[IgnoreRule]) -> bool:
    """Whether the last rule matching rel excludes it."""
    for r in reversed(rules):
        if r.matcher.fullmatch(rel):
            return not r.negate
    return False


# ---------------------------------------------------------------------------------------------------------
# sources


@dataclass
class SourceItem:
    """One matched source: host path and the name it is copied under."""

    host: str
    rel: str  # path relative to the source root (for hashing and messages)
    exclude: list[IgnoreRule] = field(default_factory=list)  # COPY --exclude, matched below the item
    sub: str = ""  # COPY --parents: the directory under the destination this item goes to


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def resolve(
    root: str, rel: str, rules: list[IgnoreRule], what: str, follow_final: bool = True, through: bool = False
) -> str | None:
    """Host path of rel below root, symlinks resolved inside root; None when the build must not see it.

    Ignored files never reach BuildKit's builder, so there a symlink is followed only within what was
    sent: rel is hidden when it, or a symlink on its way, or where that leads is ignored.  through: rel is
    a directory to look into, which an ignored one still is when a `!pattern` may re-include something
    below it.  The path returned may not exist (a dangling symlink).
    """
    links: list[str] = []
    try:
        host = secure_join(root, rel, follow_final, links)
    except RbuildError as e:
        raise RbuildError(f"{what}: {e}") from None
    if rules:
        real = os.path.relpath(host, root)
        if any(ignored(p, rules) for p in links):
            return None
        if real != "." and ignored(real, rules) and not (through and any(r.negate for r in rules)):
            return None
    return host


def _sent(root: str, rel: str, rules: list[IgnoreRule], what: str) -> str | None:
    """resolve(), where an ignored directory is still there when a `!pattern` re-includes something below
    it: docker's context transfer keeps the parent directories of a re-included path."""
    host = resolve(root, rel, rules, what)
    if host is not None or not any(r.negate for r in rules):
        return host
    host = resolve(root, rel, rules, what, through=True)
    if host is None or not os.path.isdir(host) or os.path.islink(host):
        return None
    entries = walk(SourceItem(host, rel), root, rules)
    next(entries)  # the directory itself
    return host if next(entries, None) is not None else None


def select(root: str, src: str, rules: list[IgnoreRule], what: str) -> list[SourceItem]:
    """Sources matching `src` below root (globs allowed); symlinks in the path resolve inside root, and
    ignored files are not there (see resolve)."""
    clean = os.path.normpath("/" + src).lstrip("/")
    if not _has_glob(clean):
        host = _sent(root, clean, rules, what)
        if host is None or not os.path.lexists(host):
            raise RbuildError(f"{what}: {src}: no such file or directory in the build context")
        return [SourceItem(host, clean)]
    parts = clean.split("/")
    found = [""]
    for part in parts:
        nxt = []
        for base in found:
            d = resolve(root, base, rules, what, through=True) if base else root
            if d is None:
                continue
            if _has_glob(part):
                try:
                    names = sorted(os.listdir(d))
                except OSError:
                    continue
                nxt += [os.path.join(base, n) if base else n for n in names if fnmatch.fnmatchcase(n, part)]
            else:
                cand = os.path.join(base, part) if base else part
                host = resolve(root, cand, rules, what, through=True)
                if host is not None and os.path.lexists(host):
                    nxt.append(cand)
        found = nxt
    items = []
    for rel in found:
        host = _sent(root, rel, rules, what)
        if host is not None and os.path.lexists(host):
            items.append(SourceItem(host, rel))
            continue
        entry = resolve(root, rel, rules, what, follow_final=False)
        if entry is not None and os.path.islink(entry):  # (an ignored entry is simply not there)
            raise RbuildError(f"{what}: {src}: {rel} is a symbolic link to nothing in the build context")
    if not items:
        raise RbuildError(f"{what}: {src}: no source files were specified (the pattern matched nothing)")
    return items


def walk(item: SourceItem, root: str, rules: list[IgnoreRule]) -> Iterator[tuple[str, str]]:
    """(host path, path relative to the item) for the item and, for a directory, everything below it.

    An excluded directory is still entered when a `!pattern` may re-include something below it; then it
    is emitted (before that entry) only if something inside it is, as BuildKit does.
    """
    yield item.host, ""
    if not os.path.isdir(item.host):
        return
    negations = any(r.negate for r in rules + item.exclude)
    emitted: set[str] = {""}

    def with_parents(full: str, rel: str) -> Iterator[tuple[str, str]]:
        parent = os.path.dirname(rel)
        missing = []
        while parent not in emitted:
            missing.append(parent)
            parent = os.path.dirname(parent)
        for p in reversed(missing):
            emitted.add(p)
            yield os.path.join(item.host, p), p
        yield full, rel

    real = os.path.relpath(item.host, root)  # where the item is, symlinks resolved: what the rules judge
    real = "" if real == "." else real

    def excluded(rel: str) -> bool:
        if item.exclude and ignored(rel, item.exclude):
            return True
        return bool(rules) and ignored(os.path.join(real, rel) if real else rel, rules)

    for dirpath, dirnames, filenames in os.walk(item.host):
        rel_dir = os.path.relpath(dirpath, item.host)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames.sort()
        keep = []
        for d in dirnames:
            rel = os.path.join(rel_dir, d)
            full = os.path.join(dirpath, d)
            out = excluded(rel)
            if out and not negations:
                continue
            if not os.path.islink(full):
                keep.append(d)
            if not out:
                emitted.add(rel)
                yield from with_parents(full, rel)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = os.path.join(rel_dir, name)
            if not excluded(rel):
                yield from with_parents(os.path.join(dirpath, name), rel)


def write_mask(item: SourceItem, root: str, rules: list[IgnoreRule], mask: str, fmt: LayerFormat) -> bool:
    """A layer of whiteouts (in `fmt`, the store's layer format) hiding what the ignore rules exclude below
    item (RUN --mount binds of the context see what COPY would see); False when nothing is excluded."""
    included = {rel for _, rel in walk(item, root, rules)}
    hidden = []
    for dirpath, dirnames, filenames in os.walk(item.host):
        rel_dir = os.path.relpath(dirpath, item.host)
        rel_dir = "" if rel_dir == "." else rel_dir
        for name in dirnames + filenames:
            rel = os.path.join(rel_dir, name)
            if rel not in included:
                hidden.append(rel)
        dirnames[:] = [d for d in dirnames if os.path.join(rel_dir, d) in included]
    if not hidden:
        return False
    os.mkdir(mask, 0o755)
    for rel in hidden:
        parent = os.path.dirname(rel)
        if parent and not os.path.isdir(os.path.join(mask, parent)):
            parts = parent.split("/")
            for i in range(len(parts)):
                sub = "/".join(parts[: i + 1])
                if not os.path.isdir(os.path.join(mask, sub)):
                    st = os.lstat(os.path.join(item.host, sub))
                    os.mkdir(os.path.join(mask, sub))
                    os.lchown(os.path.join(mask, sub), st.st_uid, st.st_gid)
                    os.chmod(os.path.join(mask, sub), stat.S_IMODE(st.st_mode))
        fmt.make_whiteout(os.path.join(mask, rel))
    st = os.lstat(item.host)
    os.chmod(mask, stat.S_IMODE(st.st_mode))
    return True


class FileDigests:
    """Content digests of context files, remembered by (size, mtime, ctime, inode) between builds.

    The cache key never contains mtimes; this only saves re-reading a file whose stat is unchanged
    (ctime changes with any write, even one that restores the mtime).
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.known: dict[str, list[int | str]] = {}
        self.seen: dict[str, list[int | str]] = {}
        # while a COPY's sources are hashed: a file read for its digest is copied here in the same pass, and
        # the COPY, on a cache miss, renames the copy into place (the context is read once)
        self.stage_dir: Callable[[], str] | None = None  # gives the directory (made at the first use)
        self.staged: dict[str, tuple[list[int | str], str]] = {}  # context path -> (stat stamp, its copy)
        self.copies = 0  # names them
        self._lock = threading.Lock()  # stages built at once hash their sources in threads of their own
        if path:
            try:
                with open(path, "rb") as f:
                    self.known = json.load(f)
            except (OSError, ValueError):
                self.known = {}

    def digest(
        self,
        path: str,
        st: os.stat_result,
        copy_to: str | None = None,
        finish: Callable[[int, int], None] | None = None,
        stage: bool = True,
    ) -> tuple[str, bool]:
        """(sha256 hex, whether a copy was made): a file read for its digest is copied, in the same read, to
        copy_to or (while a COPY's sources are hashed, unless not `stage`) into stage_dir; finish(source fd,
        copy fd) then."""
        stamp: list[int | str] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        old = self.known.get(path)
        if old is not None and old[:4] == stamp:
            self.seen[path] = old
            return str(old[4]), False
        h = hashlib.sha256()
        fd = _open_source(path, st)
        try:
            if copy_to is None and stage and self.stage_dir is not None:
                copy_to = os.path.join(self.stage_dir(), str(self.next_copy()))
            out = -1
            if copy_to is not None:
                out = os.open(copy_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                want, got = min(CHUNK, st.st_size + 1), 0
                while chunk := os.read(fd, want):
                    h.update(chunk)
                    if out >= 0:
                        os.write(out, chunk)  # a regular file on a local filesystem: written whole
                    got += len(chunk)
                    if len(chunk) < want and got >= st.st_size:
                        break  # short past the size lstat saw: the end (no extra read to learn it)
                if copy_to is not None:
                    if finish is not None:
                        finish(fd, out)
                    self.staged[path] = (stamp, copy_to)
            finally:
                if out >= 0:
                    os.close(out)
        finally:
            os.close(fd)
        self.seen[path] = [*stamp, h.hexdigest()]
        return h.hexdigest(), copy_to is not None

    def next_copy(self) -> int:
        """A new number for a staged copy (stages built at once stage files at once)."""
        with self._lock:
            self.copies += 1
            return self.copies

    def save(self) -> None:
        seen = dict(self.seen)  # one copy (made under the GIL): another stage's thread may add to it meanwhile
        if self.path and seen != {k: self.known.get(k) for k in seen}:
            merged = {**self.known, **seen}
            with contextlib.suppress(OSError):
                from rootless.kernel.fsutil import atomic_write

                atomic_write(self.path, json.dumps(merged).encode(), 0o600)


def _open_source(path: str, st: os.stat_result) -> int:
    """An fd to read the regular file an lstat (st) just showed at path: a swap for a symlink fails, one
    for a FIFO neither blocks nor is read (O_NONBLOCK, then the fd's own stat checked against st)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        now = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise RbuildError(f"{path}: the file was replaced while the build read it")
    return fd


def hash_sources(
    items: list[SourceItem],
    root: str,
    rules: list[IgnoreRule],
    h: hashlib._Hash,
    digests: FileDigests,
    tree: StagedTree | None = None,
) -> None:
    """Feed names, types, modes and content digests (never mtimes) into h; `tree`: lay out the (single,
    directory) item there as it is read."""
    for item in items:
        h.update(b"\0item\0" + item.rel.encode(errors="surrogateescape"))
        for path, rel in walk(item, root, rules):
            st = os.lstat(path)
            h.update(f"\0{rel}\0{st.st_mode:o}\0".encode(errors="surrogateescape"))
            building = tree is not None and tree.complete and rel != ""
            if stat.S_ISREG(st.st_mode):
                if building:
                    assert tree is not None
                    digest = tree.file(path, rel, st, digests)
                else:
                    digest = digests.digest(path, st)[0]
                h.update(f"{st.st_size}:{digest}".encode())
                continue
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode(errors="surrogateescape"))
            if building:
                assert tree is not None
                tree.copier.entry(path, os.path.join(tree.root, rel))
        if tree is not None and tree.complete:
            tree.copier.finish()


# ---------------------------------------------------------------------------------------------------------
# copying


def chown(path: str, uid: int, gid: int) -> None:
    """lchown, or, for ids this user namespace cannot map (a single-uid map, an id beyond the subuid
    range: EINVAL) or that no namespace maps at all (an unprivileged build without one: EPERM), the owner
    recorded the way layers.write_tar emits it."""
    try:
        os.lchown(path, uid, gid)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EPERM):
            raise
        from rootless.layer import layers

        layers.set_owner(path, uid, gid, ownership=Ownership.RECORDED)


Chmod = int | Callable[[int, bool], int]  # an octal mode, or a symbolic one applied to (mode, is_dir)


def parse_chmod(value: str | None, what: str) -> Chmod | None:
    """--chmod as BuildKit reads it: octal up to 07777, else a chmod(1) symbolic mode (`u=rwX,go=rX`)."""
    if not value:
        return None
    bad = f"{what}: invalid --chmod value {value!r}: it should be an octal mode up to 07777 or a symbolic mode"
    if "0" <= value[0] <= "9":
        if not re.fullmatch("[0-7]+", value) or int(value, 8) > 0o7777:
            raise RbuildError(bad)
        return int(value, 8)
    cmds = _parse_symbolic(value)
    if cmds is None:
        raise RbuildError(bad)
    return lambda mode, is_dir: _apply_symbolic(cmds, mode, is_dir)


# BuildKit parses a symbolic --chmod with github.com/tonistiigi/dchapes-mode (BSD setmode(3) in Go, umask
# 0), ported here step for step: a mode is a list of (cmd, cmd2, bits) commands.
_CLR, _SET, _GBITS, _OBITS, _UBITS = 1, 2, 4, 8, 16
_ALL = 0xFFFF  # ^modet(0): the mask with umask 0
_STANDARD = 0o6777


def _parse_symbolic(s: str) -> list[tuple[str, int, int]] | None:
    """dchapes-mode ParseWithUmask(s, 0) for a symbolic mode; None where it says ErrSyntax."""
    cmds: list[tuple[str, int, int]] = []

    def add(op: str, who: int, arg: int | str) -> None:
        if op == "=":
            cmds.append(("-", 0, who or _STANDARD))
            op = "+"
        if op in "+-X":
            assert isinstance(arg, int)
            cmds.append((op, 0, who & arg if who else _ALL & arg))
            return
        cmd2 = (_UBITS if who & 0o400 else 0) | (_GBITS if who & 0o040 else 0) | (_OBITS if who & 0o004 else 0)
        cmd2 = cmd2 if who else _UBITS | _GBITS | _OBITS
        cmds.append((op, cmd2 | {"+": _SET, "-": _CLR, "=": _SET | _CLR}[str(arg)], _ALL))

    i, equal_done = 0, False
    while True:
        who = 0
        while i < len(s) and s[i] in "augo":
            who |= {"a": _STANDARD, "u": 0o4700, "g": 0o2070, "o": 0o0007}[s[i]]
            i += 1
        if i >= len(s):
            return None
        while True:  # an operator and its permissions, again for "g=u-w"
            op = s[i]
            i += 1
            if op not in "+-=":
                return None
            if op == "=":
                equal_done = False
            who &= ~0o1000
            perm = perm_x = 0
            while True:
                b = s[i] if i < len(s) else ""
                if b and b in "rwx":
                    perm |= {"r": 0o444, "w": 0o222, "x": 0o111}[b]
                elif b == "s":
                    if who == 0 or who & ~0o007:
                        perm |= 0o6000
                elif b == "t":
                    if who == 0 or who & ~0o007:
                        who |= 0o1000
                        perm |= 0o1000
                elif b == "X":
                    if op != "-":
                        perm_x = 0o111
                    else:
                        perm |= 0o111
                elif b and b in "ugo":
                    if perm:
                        add(op, who, perm)
                        perm = 0
                    if op == "=":
                        equal_done = True
                    if perm_x:
                        add("X", who, perm_x)
                        perm_x = 0
                    add(b, who, op)
                else:
                    if perm or (op == "=" and not equal_done):
                        if op == "=":
                            equal_done = True
                        add(op, who, perm)
                    if perm_x:
                        add("X", who, perm_x)
                    break
                i += 1
            if i >= len(s):
                return _compress(cmds)
            if s[i] == ",":
                i += 1
                break


def _compress(cmds: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """dchapes-mode's compress: each run of +, - and X commands as one clear, one set and one X."""
    out: list[tuple[str, int, int]] = []
    i = 0
    while i < len(cmds):
        if cmds[i][0] not in "+-X":
            out.append(cmds[i])
            i += 1
            continue
        set_bits = clr_bits = x_bits = 0
        while i < len(cmds) and cmds[i][0] in "+-X":
            cmd, _, bits = cmds[i]
            if cmd == "-":
                clr_bits, set_bits, x_bits = clr_bits | bits, set_bits & ~bits, x_bits & ~bits
            elif cmd == "+":
                set_bits, clr_bits, x_bits = set_bits | bits, clr_bits & ~bits, x_bits & ~bits
            else:
                x_bits |= bits & ~set_bits
            i += 1
        out += [(c, 0, b) for c, b in (("-", clr_bits), ("+", set_bits), ("X", x_bits)) if b]
    return out


def _apply_symbolic(cmds: list[tuple[str, int, int]], mode: int, is_dir: bool) -> int:
    """dchapes-mode Set.Apply: X adds execute to a directory, or to a file with an execute bit already."""
    old = new = mode & 0o7777
    for cmd, cmd2, bits in cmds:
        if cmd in "ugo":
            value = {"u": (new & 0o700) >> 6, "g": (new & 0o070) >> 3, "o": new & 0o007}[cmd]
            shifts = [sh for flag, sh in ((_UBITS, 6), (_GBITS, 3), (_OBITS, 0)) if cmd2 & flag]
            if cmd2 & _CLR:
                clear = 0o007 if cmd2 & _SET else value
                for sh in shifts:
                    new &= ~(clear << sh & bits)
            if cmd2 & _SET:
                for sh in shifts:
                    new |= value << sh & bits
        elif cmd == "+":
            new |= bits
        elif cmd == "-":
            new &= ~bits
        elif old & 0o111 or is_dir:  # X
            new |= bits
    return new & 0o7777


def _mode_for(chmod: Chmod | None, mode: int) -> int:
    """The permission bits an entry of st_mode `mode` gets."""
    if chmod is None:
        return stat.S_IMODE(mode)
    if isinstance(chmod, int):
        return chmod
    return chmod(stat.S_IMODE(mode), stat.S_ISDIR(mode))


def dir_mode(chmod: Chmod | None) -> int:
    """The mode of a directory COPY creates on the way to its destination: BuildKit's fsutil copy makes them
    0755, or with the --chmod mode when that is octal (copy.go Copy and prepareTargetDir, MkdirAll)."""
    return chmod if isinstance(chmod, int) else 0o755


def copy_xattrs(src: str | int, dst: str | int) -> None:
    """The xattrs a layer can carry (user.*, security.capability), set after chown and chmod as BuildKit's
    fsutil copy does (a chown clears security.capability). A path is not followed; an fd is the file."""
    from rootless.layer.layers import _keep_xattr

    try:
        names = os.listxattr(src) if isinstance(src, int) else os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if not _keep_xattr(name):
            continue
        try:
            value = os.getxattr(src, name) if isinstance(src, int) else os.getxattr(src, name, follow_symlinks=False)
            if isinstance(dst, int):
                os.setxattr(dst, name, value)
            else:
                os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.EINVAL, errno.ENODATA, errno.EOVERFLOW):
                raise


def ensure_dir(root: str, path: str, uid: int = 0, gid: int = 0, mode: int = 0o755) -> str:
    """Create the container directory `path` (and parents, all owned by uid:gid) inside root; return its host path."""
    parts = [p for p in path.split("/") if p]
    cur = "/"
    for p in parts:
        cur = os.path.join(cur, p)
        host = secure_join(root, cur)
        if not os.path.lexists(host):
            os.mkdir(host, 0o700)
            chown(host, uid, gid)
            os.chmod(host, mode)
        elif not os.path.isdir(host):
            raise RbuildError(f"cannot create directory {cur}: a file is in the way")
    return secure_join(root, path)


class _Copier:
    """Copies entries with docker's ownership rules, keeping hardlinks and setting directory times last."""

    def __init__(
        self, owner: tuple[int, int] | None, chmod: Chmod | None, staged: dict[str, tuple[list[int | str], str]]
    ) -> None:
        self.owner = owner  # None: keep the source's ownership (COPY --from without --chown)
        self.chmod = chmod
        self.staged = staged  # copies made while hashing (FileDigests.staged): taken, not copied again
        self.links: dict[tuple[int, int], str] = {}
        self.dir_times: list[tuple[str, int, int]] = []

    def entry(self, src: str, dst: str) -> None:
        st = os.lstat(src)
        mode = st.st_mode
        if os.path.lexists(dst) and not (stat.S_ISDIR(mode) and os.path.isdir(dst) and not os.path.islink(dst)):
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            else:
                os.unlink(dst)
        if stat.S_ISREG(mode) and st.st_nlink > 1:
            first = self.links.get((st.st_dev, st.st_ino))
            if first is not None:
                os.link(first, dst)
                return
            self.links[(st.st_dev, st.st_ino)] = dst
        if stat.S_ISDIR(mode):
            if not os.path.isdir(dst):
                os.mkdir(dst, 0o700)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(mode):
            if not self._take_staged(src, st, dst):
                _copy_file(src, dst, st.st_size, st.st_dev)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        else:
            return  # sockets and device nodes in a build context are skipped, as docker does
        self.meta(src, st, dst)

    def meta(self, src: str, st: os.stat_result, dst: str) -> None:
        """dst (just made) gets src's owner (or the COPY's), mode, xattrs and times."""
        mode = st.st_mode
        if self.owner is not None:
            uid, gid = self.owner
        else:  # COPY --from keeps owners, also those recorded where the namespace could not chown
            from rootless.layer import layers

            uid, gid = layers.image_owner(src, st)
        chown(dst, uid, gid)
        if not stat.S_ISLNK(mode):
            os.chmod(dst, _mode_for(self.chmod, mode))  # after chown, which clears setuid/setgid
        copy_xattrs(src, dst)
        if stat.S_ISDIR(mode):
            self.dir_times.append((dst, st.st_atime_ns, st.st_mtime_ns))
        else:
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def file_meta(self, st: os.stat_result, src_fd: int, dst: str, fd: int) -> None:
        """meta() of a regular file copied to dst with an owner given, through both ends' open fds."""
        assert self.owner is not None
        try:
            os.fchown(fd, *self.owner)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EPERM):
                raise
            chown(dst, *self.owner)  # recorded instead
        os.fchmod(fd, _mode_for(self.chmod, st.st_mode))
        copy_xattrs(src_fd, fd)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _take_staged(self, src: str, st: os.stat_result, dst: str) -> bool:
        """Rename the copy the hashing pass made of src into dst, if src is unchanged since."""
        staged = self.staged.pop(src, None)
        if staged is None or staged[0] != [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]:
            return False
        try:
            os.rename(staged[1], dst)
        except OSError:  # another filesystem: copy as usual
            return False
        return True

    def finish(self) -> None:
        for path, atime, mtime in reversed(self.dir_times):
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)


class StagedTree:
    """A directory source laid out, owned, moded and timed as COPY puts it, written while it is hashed for
    the cache key: on a miss COPY renames the whole tree to its new destination (each file read once,
    touched once). Abandoned (`complete` False) at the first file whose digest was known, which was not
    read: its staged copies are then taken one by one (FileDigests.staged), as without a tree."""

    def __init__(self, root: str, host: str, chmod: Chmod | None) -> None:
        self.root = root  # made empty; its own owner and mode are the destination's, set when it is moved
        self.host = host  # the source directory
        self.copier = _Copier((0, 0), chmod, {})  # a context's files are 0:0 (no --chown: see CopyStep)
        self.complete = True
        self.sources: list[str] = []  # the context files whose copies the tree holds

    def file(self, path: str, rel: str, st: os.stat_result, digests: FileDigests) -> str:
        """The digest of the regular file at path, its copy made at rel in the tree in the same read."""
        dst = os.path.join(self.root, rel)
        key = (st.st_dev, st.st_ino)
        first = self.copier.links.get(key) if st.st_nlink > 1 else None
        if first is not None:
            os.link(first, dst)
            return digests.digest(path, st, stage=False)[0]  # read for the key; its copy is the link
        digest, copied = digests.digest(path, st, dst, lambda src_fd, fd: self.copier.file_meta(st, src_fd, dst, fd))
        if not copied:
            self.complete = False
            return digest
        self.sources.append(path)
        if st.st_nlink > 1:
            self.copier.links[key] = dst
        return digest

    def take(self, dst: str, uid: int, gid: int, mode: int, staged: dict[str, tuple[list[int | str], str]]) -> bool:
        """Rename the whole tree to dst (a new name in an existing directory), made as ensure_dir makes one."""
        if not self.complete:
            return False
        try:
            os.rename(self.root, dst)
        except OSError:  # another filesystem (a FUSE upper elsewhere): copied as usual
            return False
        self.complete = False  # taken once
        for path in self.sources:
            staged.pop(path, None)
        chown(dst, uid, gid)
        os.chmod(dst, mode)
        return True


def copy_entry(src: str, dst: str) -> None:
    """src copied to dst as it is: content, mode, owner and times."""
    copier = _Copier(None, None, {})
    copier.entry(src, dst)
    copier.finish()


_no_copy_range: set[tuple[int, int]] = set()  # (source dev, target dev) pairs copy_file_range refused


def _copy_file(src: str, dst: str, size: int, src_dev: int = -1) -> None:
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            left = size
            devs = (src_dev, os.fstat(fout).st_dev) if src_dev >= 0 and size else (-1, -1)
            while left > 0:
                n = -1
                if devs not in _no_copy_range:
                    try:
                        n = os.copy_file_range(fin, fout, min(left, 1 << 30))
                    except OSError:
                        if devs[0] >= 0:
                            _no_copy_range.add(devs)  # across filesystems (overlay): sendfile from now on
                if n < 0:
                    n = os.sendfile(fout, fin, None, min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def copy_into(
    root: str,
    items: list[SourceItem],
    src_root: str,
    rules: list[IgnoreRule],
    dest: str,
    owner: tuple[int, int] | None,
    chmod: Chmod | None,
    what: str,
    direct: tuple[str, list[str]] | None = None,
    staged: dict[str, tuple[list[int | str], str]] | None = None,
    tree: StagedTree | None = None,
) -> None:
    """docker's COPY rules: a directory's contents are copied; a file lands in dest/ or at dest.

    Directories COPY has to create belong to the --chown owner (root without one), as in buildah and BuildKit.
    `direct` (the overlay's upper dir and its lower dirs, top first): when dest is a new path, write there
    instead of through the overlay at root (a third of the syscalls, none of overlay's lookups in the lowers).
    `tree`: the single directory source, already laid out while it was hashed: renamed to a new dest whole.
    """
    dest_is_dir = dest.endswith("/") or len(items) > 1
    dest_clean = os.path.normpath(dest) if dest not in ("", "/") else "/"
    if len(items) > 1 and not dest.endswith("/"):
        host_dest = secure_join(root, dest_clean)
        if not os.path.isdir(host_dest):
            raise RbuildError(
                f"{what}: when using COPY with more than one source file, the destination must be "
                "a directory and end with a /"
            )
    uid, gid = owner if owner is not None else (0, 0)
    if direct is not None and _copy_up_parent(root, direct[0], direct[1], dest_clean):
        root = direct[0]  # the destination is new: every write goes straight into the upper dir
        if tree is not None and len(items) == 1 and items[0].host == tree.host and not items[0].sub:
            if owner == (0, 0) and dest_clean != "/":
                parent = ensure_dir(root, os.path.dirname(dest_clean), uid, gid, dir_mode(chmod))
                target = os.path.join(parent, os.path.basename(dest_clean))
                if tree.take(target, uid, gid, dir_mode(chmod), staged if staged is not None else {}):
                    return
    copier = _Copier(owner, chmod, staged if staged is not None else {})
    for item in items:
        host = item.host  # already resolved inside src_root by select()
        item_dest = os.path.join(dest_clean, item.sub) if item.sub else dest_clean
        if os.path.isdir(host):
            # the destination itself is resolved inside root, symlinks followed (BuildKit: fs.RootPath in
            # fsutil copy.go Copy); a directory below it meets what the image has there as it is: a symlink
            # or a file where the source has a directory is an error (copy.go copyDirectoryOnly)
            resolved = {"": ensure_dir(root, item_dest, uid, gid, dir_mode(chmod))}
            for path, rel in walk(item, src_root, rules):
                if not rel:
                    continue
                dst = os.path.join(resolved[os.path.dirname(rel)], os.path.basename(rel))
                if os.path.isdir(path) and not os.path.islink(path):
                    if os.path.lexists(dst) and (os.path.islink(dst) or not os.path.isdir(dst)):
                        shown = os.path.normpath(os.path.join(item_dest, rel))
                        raise RbuildError(f"{what}: cannot copy to non-directory: {shown}")
                    resolved[rel] = dst
                copier.entry(path, dst)
            continue
        if dest_is_dir or item.sub or os.path.isdir(secure_join(root, item_dest)):
            target_dir = ensure_dir(root, item_dest, uid, gid, dir_mode(chmod))
            copier.entry(host, os.path.join(target_dir, os.path.basename(item.rel or host)))
        else:
            target_dir = ensure_dir(root, os.path.dirname(dest_clean), uid, gid, dir_mode(chmod))
            copier.entry(host, os.path.join(target_dir, os.path.basename(dest_clean)))
    copier.finish()


def _copy_up_parent(merged: str, upper: str, lowers: list[str], dest: str) -> bool:
    """Make the upper dir ready for dest to be written into it directly, as the overlay would: False (and
    nothing changed) unless dest is absent from the tree and from every layer below, so nothing merges there.

    dest's nearest existing ancestor (no symlink on the way: else False) is copied up like overlayfs does it:
    each directory not yet in the upper made with the owner, mode, xattrs and times of the merged one.
    """
    parts = [p for p in dest.split("/") if p]
    if not parts:
        return False
    try:
        followed: list[str] = []
        host = secure_join(merged, "/" + "/".join(parts), follow_final=False, followed=followed)
        if followed or os.path.lexists(host):
            return False  # a symlink on the way: the writes below resolve dest themselves, through the overlay
        # the nearest ancestor that exists, as a path below merged (symlinks already resolved)
        rel = os.path.relpath(host, merged)
        chain = [] if rel == "." else rel.split("/")
        base = len(chain)
        while base > 0 and not os.path.lexists(os.path.join(merged, *chain[:base])):
            base -= 1
        new_name = chain[base] if base < len(chain) else None
        anc = chain[:base]
        if new_name is None or not os.path.isdir(os.path.join(merged, *anc)):
            return False
        for lower in lowers:  # a whiteout or any entry of that name below: the overlay would merge or hide
            if os.path.lexists(os.path.join(lower, *anc, new_name)):
                return False
        for i in range(len(anc) + 1):  # what the upper already has must be plain directories
            p = os.path.join(upper, *anc[:i])
            if os.path.lexists(p) and (os.path.islink(p) or not os.path.isdir(p)):
                return False
        if os.path.lexists(os.path.join(upper, *anc, new_name)):
            return False
    except OSError:
        return False
    made: list[tuple[str, os.stat_result]] = []
    for i in range(1, len(anc) + 1):
        up = os.path.join(upper, *anc[:i])
        if os.path.isdir(up):
            continue
        src = os.path.join(merged, *anc[:i])
        st = os.lstat(src)
        os.mkdir(up, 0o700)
        os.lchown(up, st.st_uid, st.st_gid)
        os.chmod(up, stat.S_IMODE(st.st_mode))
        for name in os.listxattr(src, follow_symlinks=False):
            if not name.startswith("user.overlay."):
                os.setxattr(up, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        made.append((up, st))
    for up, st in reversed(made):  # a copy-up keeps the times; only dest's own parent changes when dest is made
        os.utime(up, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return True


def write_file(root: str, dest: str, data: bytes, uid: int, gid: int, chmod: Chmod | None) -> None:
    """COPY <<EOF /file: a heredoc body becomes a file."""
    dest_clean = os.path.normpath(dest)
    target_dir = ensure_dir(root, os.path.dirname(dest_clean), uid, gid, dir_mode(chmod))
    path = os.path.join(target_dir, os.path.basename(dest_clean))
    if os.path.lexists(path) and not os.path.isdir(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.write(data)
    chown(path, uid, gid)
    os.chmod(path, _mode_for(chmod, stat.S_IFREG | 0o644))
