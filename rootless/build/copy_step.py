"""COPY and ADD: sources from the context, another stage, an image, a URL or a local archive, into the tree.

The cache key holds the sources' content, names and modes (never mtimes); a URL without --checksum is
fetched once per build to learn its content.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rootless.build import copyfiles
from rootless.build.state import StageState
from rootless.build.step import Step
from rootless.errors import RbuildError
from rootless.frontend import instructions as ins
from rootless.kernel.fspath import clean_abs
from rootless.sandbox import spec as sandbox

if TYPE_CHECKING:
    from rootless.build.executor import Executor


class CopyStep(Step[ins.CopyCmd | ins.AddCmd]):
    def __init__(self, ex: Executor) -> None:
        super().__init__(ex)
        self.downloads: dict[str, Download] = {}
        self.download_dir: str | None = None
        self.stage_dir: str | None = None  # the copies made while hashing context sources (FileDigests.staged)
        self._lock = threading.RLock()  # stages built at once share the downloads and the staging directory
        # each COPY's source laid out by its hashing pass, by id(cmd): stages built at once hash at once
        self.trees: dict[int, tuple[ins.CopyCmd | ins.AddCmd, copyfiles.StagedTree]] = {}

    def describe(self, cmd: ins.CopyCmd | ins.AddCmd) -> str:
        flags = []
        source = cmd.from_ if isinstance(cmd, ins.CopyCmd) else None
        if source:
            flags.append(f"--from={source}")
        if cmd.chown:
            flags.append(f"--chown={cmd.chown}")
        if cmd.chmod:
            flags.append(f"--chmod={cmd.chmod}")
        srcs = cmd.sources if cmd.sources else [h.name for h in cmd.heredocs]
        return " ".join([cmd.node.keyword.upper(), *flags, *srcs, cmd.dest]) + " # buildkit"

    def copy_source_root(self, cmd: ins.CopyCmd | ins.AddCmd) -> tuple[str, list[str] | None]:
        """('context', None) or ('stage'/'image', layer list) for COPY --from."""
        return self.ex.source_of(getattr(cmd, "from_", None), cmd)  # ADD has no --from

    def cache_extra(self, state: StageState, cmd: ins.CopyCmd | ins.AddCmd) -> object:
        """What COPY/ADD's cache key needs beyond the instruction: its sources' content."""
        kind, layer_list = self.copy_source_root(cmd)
        if kind not in ("context", "dir"):
            return [kind, layer_list]
        root = self.ex.plan.context if kind == "context" else (layer_list or [""])[0]
        rules = self.ex.ignore_rules if kind == "context" else []
        if not cmd.sources:
            return ["heredoc", [(h.name, h.content) for h in cmd.heredocs]]
        h = hashlib.sha256()
        what = f"{self.ex.plan.filename}:{cmd.node.start_line}: {cmd.node.keyword.upper()}"
        digests = self.ex.file_digests
        digests.stage_dir = self.staging_dir
        try:
            self._hash_sources(cmd, h, what, root, rules)
        finally:
            digests.stage_dir = None
        digests.save()
        return [kind, h.hexdigest()]

    def staging_dir(self) -> str:
        """Where the hashing pass copies context files (kept for the build, removed at its end)."""
        with self._lock:
            if self.stage_dir is None:
                self.stage_dir = self.ex.build_stack.enter_context(self.ex.store.staging("copy-"))
            return self.stage_dir

    def _hash_sources(
        self, cmd: ins.CopyCmd | ins.AddCmd, h: hashlib._Hash, what: str, root: str, rules: list[copyfiles.IgnoreRule]
    ) -> None:
        self.trees.pop(id(cmd), None)
        if self._tree_fits(cmd):
            items = select_items(root, cmd.sources[0], cmd, rules, what)
            if len(items) == 1 and os.path.isdir(items[0].host):
                chmod = copyfiles.parse_chmod(cmd.chmod, what)
                tree_root = os.path.join(self.staging_dir(), f"tree-{self.ex.file_digests.next_copy()}")
                os.mkdir(tree_root, 0o700)
                tree = copyfiles.StagedTree(tree_root, items[0].host, chmod)
                copyfiles.hash_sources(items, root, rules, h, self.ex.file_digests, tree)
                self.trees[id(cmd)] = (cmd, tree)
                return
        for src in cmd.sources:
            if _is_url(src):
                checksum = getattr(cmd, "checksum", None)
                if checksum:  # the content is pinned: no need to fetch it to know the key
                    h.update(f"url\0{src}\0{checksum}".encode())
                else:  # the key is the content, as BuildKit's: a changed file behind the URL is seen
                    h.update(f"url\0{src}\0{self.download(src, what, None).digest}".encode())
                continue
            items = select_items(root, src, cmd, rules, what)
            copyfiles.hash_sources(items, root, rules, h, self.ex.file_digests)

    def _tree_fits(self, cmd: ins.CopyCmd | ins.AddCmd) -> bool:
        """Whether the source can be laid out while it is hashed (StagedTree): one directory of the context
        going 0:0 to a path of its own, where a driver with a separate upper dir can take it whole."""
        if not isinstance(cmd, ins.CopyCmd) or cmd.chown or cmd.parents or len(cmd.sources) != 1:
            return False
        return self.ex.driver.name != "copy" and not _is_url(cmd.sources[0])

    def apply(self, state: StageState, cmd: ins.CopyCmd | ins.AddCmd) -> bool:

        what = f"{self.ex.plan.filename}:{cmd.node.start_line}: {cmd.node.keyword.upper()}"
        chmod = copyfiles.parse_chmod(cmd.chmod, what)
        kind, layer_list = self.copy_source_root(cmd)
        c = state.config["config"]
        dest = cmd.dest
        workdir = c.get("WorkingDir") or "/"
        dest_abs = clean_abs(dest, workdir) + ("/" if dest.endswith("/") and dest not in ("/",) else "")
        if dest in (".", "./") or dest.endswith("/."):
            dest_abs = clean_abs(dest, workdir) + "/"

        def action(merged: str, scratch: str) -> None:
            # a context's files are 0:0 (a --build-context directory's too); --from a stage or image keeps owners
            owner: tuple[int, int] | None = (0, 0) if kind in ("context", "dir") else None
            if cmd.chown:
                try:
                    u = sandbox.resolve_user(merged, cmd.chown)
                except RbuildError as e:
                    raise self.ex.err(cmd.node, f"--chown={cmd.chown}: {e}") from None
                # BuildKit (solver/llbsolver/ops/user_linux.go readUser): a user name alone takes its primary
                # group from the stage's /etc/passwd, a uid alone is also the gid
                by_id = cmd.chown.isdigit()
                owner = (u.uid, u.uid if by_id else u.gid)  # unmappable ids are recorded
            try:
                if not cmd.sources:
                    for h in cmd.heredocs:
                        target = dest_abs if not dest_abs.endswith("/") else dest_abs + h.name
                        copyfiles.write_file(merged, target, h.content.encode(), *(owner or (0, 0)), chmod)
                    return
                if kind in ("context", "dir"):
                    self.copy_from(
                        merged,
                        self.ex.plan.context if kind == "context" else (layer_list or [""])[0],
                        cmd,
                        dest_abs,
                        owner,
                        chmod,
                        what,
                        isinstance(cmd, ins.AddCmd),
                        scratch,
                    )
                    return
                with contextlib.ExitStack() as stack:
                    view = self.ex.layers_view(layer_list or [], os.path.join(os.path.dirname(merged), "src"), stack)
                    self.copy_from(merged, view, cmd, dest_abs, owner, chmod, what, False, scratch)
            except OSError as e:
                raise self.ex.err(
                    cmd.node, f"{cmd.node.keyword.upper()} failed: {e.strerror}: {_image_path(e.filename, merged)}"
                ) from None

        return self.ex.with_rootfs(state, action)

    def download(self, url: str, what: str, checksum: str | None) -> Download:
        """A URL's content, fetched once per build into the store's staging area."""
        with self._lock:  # one fetch of a URL that stages built at once both name
            got = self.downloads.get(url)
            if got is None:
                if self.download_dir is None:
                    self.download_dir = self.ex.build_stack.enter_context(self.ex.store.staging("download-"))
                got = _download(url, self.download_dir, what)
                self.downloads[url] = got
        if checksum:
            got.check(checksum, url, what)
        return got

    def copy_from(
        self,
        merged: str,
        src_root: str,
        cmd: ins.CopyCmd | ins.AddCmd,
        dest: str,
        owner: tuple[int, int] | None,
        chmod: copyfiles.Chmod | None,
        what: str,
        is_add: bool,
        scratch: str,
    ) -> None:
        rules = self.ex.ignore_rules if src_root == self.ex.plan.context else []
        items: list[copyfiles.SourceItem] = []
        remote: set[str] = set()
        for src in cmd.sources:
            if is_add and _is_url(src):
                items.append(self.download(src, what, getattr(cmd, "checksum", None)).item)
                remote.add(items[-1].host)  # remote archives are not unpacked (docker's rule)
                continue
            items += select_items(src_root, src, cmd, rules, what)
        if is_add and getattr(cmd, "unpack", None) is not False:
            plain = []
            for it in items:
                if it.host not in remote and os.path.isfile(it.host) and _is_archive(it.host):
                    uid, gid = owner or (0, 0)
                    target = copyfiles.ensure_dir(merged, dest, uid, gid)
                    from rootless.layer.layers import unpack_archive

                    unpack_archive(it.host, target, owner if cmd.chown else None, what, self.ex.strategy.ownership)
                else:
                    plain.append(it)
            items = plain
            if not items:
                return
        upper = self.ex.step_upper
        direct = (upper, self.ex.step_lowers) if upper != merged else None
        staged = self.ex.file_digests.staged  # keyed by context paths: other sources find nothing there
        laid_out = self.trees.pop(id(cmd), None)
        tree = laid_out[1] if laid_out is not None and laid_out[0] is cmd else None
        copyfiles.copy_into(merged, items, src_root, rules, dest, owner, chmod, what, direct, staged, tree)


def select_items(
    src_root: str, src: str, cmd: ins.CopyCmd | ins.AddCmd, rules: list[copyfiles.IgnoreRule], what: str
) -> list[copyfiles.SourceItem]:
    """A COPY/ADD source's items, with --exclude applied and --parents' sub-directories worked out."""
    found = copyfiles.select(src_root, src, rules, what)
    if cmd.exclude:
        exclude = copyfiles.patterns_to_rules(cmd.exclude, lambda n: f"{what} --exclude")
        found = [it for it in found if not copyfiles.ignored(os.path.basename(it.rel), exclude)]
        for it in found:
            it.exclude = exclude
    if cmd.parents:  # keep the path below the context (or below a /./ pivot in the source)
        pivot = src.split("/./", 1)[0] if "/./" in src else ""
        base = os.path.normpath("/" + pivot).lstrip("/")
        for it in found:
            kept = os.path.relpath(it.rel, base) if base else it.rel
            it.sub = kept if os.path.isdir(it.host) else os.path.dirname(kept)
    return found


def _image_path(path: object, merged: str) -> str:
    """A host path in the tree mounted at merged as the image names it (other paths as they are)."""
    if not isinstance(path, str):
        return ""
    rel = os.path.relpath(path, merged)
    if rel == ".." or rel.startswith("../"):
        return path
    return "/" if rel == "." else "/" + rel


def _is_url(src: str) -> bool:
    return src.startswith(("http://", "https://"))


def _is_archive(path: str) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False
    except (ValueError, EOFError):  # a tar header whose contents are damaged: the unpacker says how
        return True


@dataclass
class Download:
    item: copyfiles.SourceItem
    digest: str  # sha256 hex of the content

    def check(self, checksum: str, url: str, what: str) -> None:
        """ADD --checksum=ALGO:HEX (sha256 when no algorithm is named)."""
        algo, _, want = checksum.partition(":") if ":" in checksum else ("sha256", "", checksum)
        if algo not in ("sha256", "sha384", "sha512"):
            raise RbuildError(f"{what}: unsupported --checksum algorithm {algo!r} (use sha256, sha384 or sha512)")
        if algo == "sha256":
            got = self.digest
        else:
            h = hashlib.new(algo)
            with open(self.item.host, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            got = h.hexdigest()
        if got != want:
            raise RbuildError(f"{what}: {url} does not match --checksum={checksum} (got {algo}:{got})")


def _download(url: str, into: str, what: str) -> Download:
    import urllib.parse
    import urllib.request

    try:
        name = os.path.basename(urllib.parse.urlparse(url).path)
    except ValueError as e:  # a malformed URL, such as http://[::1
        raise RbuildError(f"{what}: cannot download {url}: {e}") from None
    if name in ("", ".", ".."):
        name = "index.html"
    d = tempfile.mkdtemp(dir=into)
    path = os.path.join(d, name)
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as out:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            lm = resp.headers.get("Last-Modified")
    except (OSError, ValueError) as e:
        raise RbuildError(f"{what}: cannot download {url}: {e}") from None
    os.chmod(path, 0o600)
    if lm:
        import email.utils

        try:
            t = email.utils.parsedate_to_datetime(lm).timestamp()
            os.utime(path, (t, t))
        except (TypeError, ValueError):
            pass
    return Download(copyfiles.SourceItem(path, name), h.hexdigest())
