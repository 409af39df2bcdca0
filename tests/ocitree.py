"""Flatten an OCI image into a comparable description, for the differential and interop tests.

An image is read from an OCI image layout directory (optionally picking a ref name), an oci-archive or a
docker-archive tar. `flatten` applies the layers in order the way an overlay mount (or an OCI unpacker)
would, whiteouts and opaque markers included, and describes every path of the merged tree as an `Entry`:

    (type, mode, uid, gid, size, sha256, link, xattrs)

  type    "dir", "file", "symlink", "char", "block", "fifo"
  mode    permission bits incl. setuid/setgid/sticky (mode & 0o7777)
  size    bytes of a regular file, else 0
  sha256  hex digest of a regular file's content, else ""
  link    a symlink's target; for a regular file that shares its inode with other paths (hardlinks)
          "=" + the smallest path of that group, so the same link structure compares equal whichever
          name a tool happened to store first; "c:MAJ:MIN" for devices; else ""
  xattrs  the extended attributes (PAX SCHILY.xattr.*) as sorted (name, value) pairs

Modification times are ignored on purpose: the builders are not expected to agree on them.
`compared_config` extracts the user-facing config keys the differential tests compare.
Only the standard library is used (plus `zstandard` for zstd layers, which rbuild itself depends on).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple


class Entry(NamedTuple):
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str
    link: str
    xattrs: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        s = f"{self.type} {self.mode:04o} {self.uid}:{self.gid}"
        if self.type == "file":
            s += f" size={self.size} sha256={self.sha256[:12]}"
        if self.link:
            s += f" link={self.link}"
        if self.xattrs:
            s += " xattrs=" + ",".join(f"{k}={v!r}" for k, v in self.xattrs)
        return s


Tree = dict[str, Entry]

# the user-facing config keys compared between builders (Shell, Healthcheck and OnBuild exist only in the
# docker format: buildah drops them from OCI images, so they are compared separately where relevant)
CONFIG_KEYS = ("User", "Env", "Entrypoint", "Cmd", "WorkingDir", "Labels", "ExposedPorts", "Volumes", "StopSignal")
DOCKER_ONLY_KEYS = ("Shell", "Healthcheck", "OnBuild")


@dataclass
class Image:
    config: dict[str, Any]  # the whole image config document
    manifest: dict[str, Any]  # the OCI manifest (or the docker-archive manifest.json entry)
    layers: list[bytes]  # uncompressed layer tars, bottom first

    @property
    def runtime_config(self) -> dict[str, Any]:
        return dict(self.config.get("config") or self.config.get("Config") or {})


# -------------------------------------------------------------------------------------------------------
# reading images


def decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        out = io.BytesIO()
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
            while chunk := r.read(1 << 20):
                out.write(chunk)
        return out.getvalue()
    return data


def _reader(path: str) -> Callable[[str], bytes]:
    if os.path.isdir(path):

        def read_dir(name: str) -> bytes:
            with open(os.path.join(path, name), "rb") as f:
                return f.read()

        return read_dir
    with tarfile.open(path) as tf:
        members: dict[str, bytes] = {}
        for m in tf:
            if m.isreg():
                fobj = tf.extractfile(m)
                assert fobj is not None
                members[posixpath.normpath(m.name.lstrip("/"))] = fobj.read()

    def read_tar(name: str) -> bytes:
        try:
            return members[posixpath.normpath(name)]
        except KeyError:
            raise FileNotFoundError(name) from None

    return read_tar


def _blob(read: Callable[[str], bytes], digest: str, verify: bool = True) -> bytes:
    algo, _, hexd = digest.partition(":")
    data = read(f"blobs/{algo}/{hexd}")
    if verify and algo == "sha256" and hashlib.sha256(data).hexdigest() != hexd:
        raise ValueError(f"blob {digest} does not match its digest")
    return data


def load(path: str, ref: str | None = None) -> Image:
    """An image from an OCI layout dir, an oci-archive or a docker-archive (ref picks an OCI ref name)."""
    read = _reader(path)
    try:
        index = json.loads(read("index.json"))
    except FileNotFoundError:
        return _load_docker_archive(read)
    descs = index["manifests"]
    if ref is not None:
        descs = [d for d in descs if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref]
        if not descs:
            raise KeyError(f"no manifest named {ref!r} in {path}")
    if len(descs) != 1:
        raise ValueError(f"{path}: expected one manifest, found {len(descs)}")
    doc = json.loads(_blob(read, descs[0]["digest"]))
    while "manifests" in doc:  # a nested index: take its only (or first linux) manifest
        doc = json.loads(_blob(read, doc["manifests"][0]["digest"]))
    config = json.loads(_blob(read, doc["config"]["digest"]))
    layers = [decompress(_blob(read, d["digest"])) for d in doc["layers"]]
    _check_diff_ids(config, layers)
    return Image(config, doc, layers)


def _load_docker_archive(read: Callable[[str], bytes]) -> Image:
    entries = json.loads(read("manifest.json"))
    if len(entries) != 1:
        raise ValueError(f"docker-archive: expected one image, found {len(entries)}")
    man = entries[0]
    config = json.loads(read(man["Config"]))
    layers = [decompress(read(name)) for name in man["Layers"]]
    _check_diff_ids(config, layers)
    return Image(config, man, layers)


def _check_diff_ids(config: dict[str, Any], layers: list[bytes]) -> None:
    want = config.get("rootfs", {}).get("diff_ids", [])
    got = ["sha256:" + hashlib.sha256(raw).hexdigest() for raw in layers]
    if want != got:
        raise ValueError(f"config diff_ids {want} do not match the layers {got}")


# -------------------------------------------------------------------------------------------------------
# flattening


def _norm(name: str) -> str:
    p = posixpath.normpath("/" + name.lstrip("/"))
    return "/" if p == "//" else p


def _under(tree: dict[str, Any], path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    return [p for p in tree if p.startswith(prefix)]


_KIND = {
    tarfile.DIRTYPE: "dir",
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


def flatten(layers: Iterable[bytes]) -> Tree:
    """The merged file tree of the layers (bottom first), whiteouts applied, hardlinks resolved."""
    # path -> (entry without the hardlink group, inode number)
    nodes: dict[str, tuple[Entry, int]] = {}
    next_ino = 0
    for raw in layers:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            members = list(tf)
            # whiteouts hide what the lower layers hold, never what this layer adds: apply them first
            for m in members:
                name = _norm(m.name)
                d, b = posixpath.split(name)
                if b == ".wh..wh..opq":
                    for p in _under(nodes, d):
                        del nodes[p]
                elif b.startswith(".wh."):
                    victim = posixpath.join(d, b[4:])
                    for p in [victim, *_under(nodes, victim)]:
                        nodes.pop(p, None)
            for m in members:
                name = _norm(m.name)
                b = posixpath.basename(name)
                if name == "/" or b.startswith(".wh."):
                    continue
                if m.islnk():
                    target = _norm(m.linkname)
                    if target not in nodes or nodes[target][0].type != "file":
                        raise ValueError(f"hardlink {name} -> {target}: no such regular file")
                    new = nodes[target]
                else:
                    kind = _KIND.get(m.type)
                    if kind is None:
                        raise ValueError(f"{name}: unsupported tar entry type {m.type!r}")
                    size, digest, link = 0, "", ""
                    if kind == "file":
                        fobj = tf.extractfile(m)
                        assert fobj is not None
                        data = fobj.read()
                        size, digest = len(data), hashlib.sha256(data).hexdigest()
                    elif kind == "symlink":
                        link = m.linkname
                    elif kind in ("char", "block"):
                        link = f"c:{m.devmajor}:{m.devminor}"
                    xattrs = tuple(
                        sorted(
                            (k.removeprefix("SCHILY.xattr."), v)
                            for k, v in m.pax_headers.items()
                            if k.startswith("SCHILY.xattr.")
                        )
                    )
                    next_ino += 1
                    new = (Entry(kind, m.mode & 0o7777, m.uid, m.gid, size, digest, link, xattrs), next_ino)
                old = nodes.get(name)
                if old is not None and old[0].type == "dir" and new[0].type != "dir":
                    for p in _under(nodes, name):  # a non-directory replaces a whole directory
                        del nodes[p]
                nodes[name] = new
    groups: dict[int, list[str]] = {}
    for p, (e, ino) in nodes.items():
        if e.type == "file":
            groups.setdefault(ino, []).append(p)
    tree: Tree = {}
    for p, (e, ino) in sorted(nodes.items()):
        members_ = groups.get(ino, [])
        tree[p] = e._replace(link="=" + min(members_)) if len(members_) > 1 else e
    return tree


# -------------------------------------------------------------------------------------------------------
# comparing


def compared_config(image: Image, keys: Iterable[str] = CONFIG_KEYS, drop_labels: Iterable[str] = ()) -> dict[str, Any]:
    """The compared runtime config keys; absent, null and empty values are all left out."""
    c = image.runtime_config
    out: dict[str, Any] = {}
    for k in keys:
        v = c.get(k)
        if k == "Labels" and isinstance(v, dict):
            v = {lk: lv for lk, lv in v.items() if lk not in set(drop_labels)}
        if v not in (None, "", [], {}):
            out[k] = v
    return out


def diff_trees(a: Tree, b: Tree, names: tuple[str, str] = ("A", "B")) -> list[str]:
    out = []
    for p in sorted(set(a) | set(b)):
        if p not in b:
            out.append(f"only in {names[0]}: {p} {a[p]}")
        elif p not in a:
            out.append(f"only in {names[1]}: {p} {b[p]}")
        elif a[p] != b[p]:
            out.append(f"differs: {p}\n    {names[0]}: {a[p]}\n    {names[1]}: {b[p]}")
    return out


def diff_configs(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> list[str]:
    return [
        f"config {k}:\n    {names[0]}: {a.get(k)!r}\n    {names[1]}: {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def drop_empty_stubs(tree: Tree, stubs: Iterable[str]) -> Tree:
    """The tree without those of `stubs` that are empty files or empty directories."""
    out = dict(tree)
    for p in stubs:
        e = out.get(p)
        if e is None:
            continue
        if (e.type == "file" and e.size == 0) or (e.type == "dir" and not _under(out, p)):
            del out[p]
    return out
