"""`rbuild save` / `rbuild load` (and `--output type=oci|docker`): images in one tar, docker's or OCI's way.

docker-archive is what `docker save` writes: `manifest.json` (per image its config file, its `RepoTags`
and its layer tars), `repositories` for the named ones, the config as HEX.json and each layer
uncompressed as HEX/layer.tar (HEX: its diff_id). oci-archive is an OCI image layout in a tar, one index
entry per name with docker's annotations (`io.containerd.image.name`: the full name,
`org.opencontainers.image.ref.name`: its tag). Loading takes either format, compressed or not (gzip,
zstd, bzip2, xz), also as skopeo and buildah write docker-archive (layers as HEX.tar) and as docker 25
does (an OCI layout and a manifest.json naming blobs/sha256/HEX). The archive is unpacked by the layer
unpacker (`layers.unpack_archive`) into the store's scratch space, and every file is opened beneath it,
regular files only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from rootless.blob.digest import hex_of
from rootless.errors import RbuildError
from rootless.kernel.fspath import open_beneath, open_regular
from rootless.layer import layers
from rootless.oci import image as img
from rootless.oci import schema as ocischema
from rootless.oci import transports
from rootless.store.store import ImageRecord, Store, chain_ids

CONTAINERD_NAME = "io.containerd.image.name"
FORMATS = ("docker-archive", "oci-archive")
_CHUNK = 1 << 20
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"


@dataclass
class Written:
    """One image as an archive holds it: its manifest's digest, media type and size."""

    record: ImageRecord
    digest: str
    media_type: str
    size: int


# ------------------------------------------------------------------------------------------------ writing


def write(store: Store, images: list[tuple[ImageRecord, list[str]]], fmt: str, out: BinaryIO) -> list[Written]:
    """Write the images (each with the full names to give it) to `out` as a `fmt` archive, streaming."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        if fmt == "docker-archive":
            return _write_docker(store, images, tf)
        return _write_oci(store, images, tf)


def _layer_tar(store: Store, chain: str, diff_id: str, own: dict[str, Any] | None, out: str) -> None:
    """The layer's exact tar at `out`: its stored blob decompressed, or its directory written."""
    meta = store.layer_meta(chain)
    with open(out, "wb") as dst:
        if meta.get("origin") == "dir":
            layers.write_tar(store.layer_dir(chain), dst)
            return
        with layers.open_blob(transports.tar_source(store, meta, own), diff_id=diff_id) as src:
            shutil.copyfileobj(src, dst, _CHUNK)


def _write_docker(store: Store, images: list[tuple[ImageRecord, list[str]]], tf: tarfile.TarFile) -> list[Written]:
    entries: list[dict[str, Any]] = []
    repos: dict[str, dict[str, str]] = {}
    done: set[str] = set()
    sizes: dict[str, int] = {}
    written = []
    with store.staging("save-") as tmp:
        for rec, names in images:
            config = store.read_blob(rec.id)
            diff_ids = json.loads(config).get("rootfs", {}).get("diff_ids", [])
            own: list[Any] = list(store.read_json(rec.manifest).get("layers", []))
            if len(own) != len(diff_ids):
                own = [None] * len(diff_ids)
            layer_names = []
            descs = []
            for diff_id, chain, o in zip(diff_ids, chain_ids(diff_ids), own, strict=True):
                name = hex_of(diff_id) + "/layer.tar"
                layer_names.append(name)
                path = os.path.join(tmp, "layer.tar")
                if name not in done:
                    _layer_tar(store, chain, diff_id, o, path)
                    transports.tar_add(tf, hex_of(diff_id))
                    transports.tar_add(tf, name, path=path)
                    sizes[name] = os.path.getsize(path)
                    os.unlink(path)
                    done.add(name)
                descs.append({"mediaType": img.DOCKER_LAYER, "digest": diff_id, "size": sizes[name]})
            config_name = hex_of(rec.id) + ".json"
            if config_name not in done:
                transports.tar_add(tf, config_name, data=config)
                done.add(config_name)
            tags = [n for n in names if "@" not in n]
            entries.append({"Config": config_name, "RepoTags": tags or None, "Layers": layer_names})
            for t in tags:
                repo, _, tag = t.rpartition(":")
                repos.setdefault(repo, {})[tag] = hex_of(diff_ids[-1]) if diff_ids else hex_of(rec.id)
            man = img.canonical(img.manifest("docker", rec.id, len(config), descs))
            written.append(Written(rec, "sha256:" + hashlib.sha256(man).hexdigest(), img.DOCKER_MANIFEST, len(man)))
    transports.tar_add(tf, "manifest.json", data=json.dumps(entries).encode())
    if repos:
        transports.tar_add(tf, "repositories", data=json.dumps(repos).encode())
    return written


def _write_oci(store: Store, images: list[tuple[ImageRecord, list[str]]], tf: tarfile.TarFile) -> list[Written]:
    transports.tar_add(tf, "blobs")
    transports.tar_add(tf, "blobs/sha256")
    done: set[str] = set()

    def put(digest: str, data: bytes | None = None, path: str | None = None) -> None:
        if digest not in done:
            done.add(digest)
            transports.tar_add(tf, "blobs/sha256/" + hex_of(digest), data=data, path=path)

    index: list[dict[str, Any]] = []
    written = []
    for rec, names in images:
        exp = transports.prepare_export(store, rec, "oci", "gzip", None)
        for b in exp.layers:
            put(b.descriptor["digest"], path=b.path)
        put(exp.config_digest, data=exp.config)
        put(exp.manifest_digest, data=exp.manifest)
        desc = {"mediaType": exp.manifest_media_type, "digest": exp.manifest_digest, "size": len(exp.manifest)}
        for n in names or [""]:
            entry: dict[str, Any] = dict(desc)
            if n:
                entry["annotations"] = {CONTAINERD_NAME: n, img.REF_NAME: n.rpartition(":")[2]}
            index.append(entry)
        written.append(Written(rec, exp.manifest_digest, exp.manifest_media_type, len(exp.manifest)))
    doc = {"schemaVersion": 2, "mediaType": img.OCI_INDEX, "manifests": index}
    transports.tar_add(tf, "index.json", data=json.dumps(doc, sort_keys=True).encode())
    transports.tar_add(tf, "oci-layout", data=b'{"imageLayoutVersion":"1.0.0"}')
    return written


# ------------------------------------------------------------------------------------------------ reading


class _Dir:
    """Files of an unpacked archive, opened beneath its directory, never through a symlink, regular only."""

    def __init__(self, root: str, shown: str) -> None:
        self.root = root
        self.shown = shown

    def open(self, rel: str) -> BinaryIO:
        rel = os.path.normpath(rel)
        if rel.startswith(("/", "..")) or rel == ".":
            raise RbuildError(f"{self.shown}: {rel!r} is not a file name inside the archive")
        try:
            dfd = open_beneath(self.root, os.path.dirname(rel))
            try:
                return open_regular(os.path.basename(rel), f"{self.shown}: {rel}", dir_fd=dfd, follow=False)
            finally:
                os.close(dfd)
        except FileNotFoundError:
            raise RbuildError(f"{self.shown}: {rel} is missing from the archive") from None
        except OSError as e:
            raise RbuildError(f"{self.shown}: {rel}: cannot read: {e.strerror or e}") from None

    def read(self, rel: str, limit: int) -> bytes:
        with self.open(rel) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise RbuildError(f"{self.shown}: {rel} is larger than {limit} bytes")
        return data

    def exists(self, rel: str) -> bool:
        return os.path.lexists(os.path.join(self.root, rel))


@dataclass
class Found:
    """An image read from an archive, ready for `transports.import_image`, and the names it comes with."""

    source: transports.Source
    names: list[str]


@contextlib.contextmanager
def read(path: str, store: Store, shown: str) -> Iterator[list[Found]]:
    """The images in the archive at `path` (docker-archive or oci-archive; plain, gzip, zstd, bzip2 or xz)."""
    with store.staging("load-") as tmp:
        root = os.path.join(tmp, "archive")
        os.mkdir(root, 0o700)
        layers.unpack_archive(path, root, (os.getuid(), os.getgid()), shown)
        d = _Dir(root, shown)
        if d.exists("manifest.json"):
            yield _docker_images(d)
        elif d.exists("index.json"):
            yield _oci_images(d, root)
        else:
            raise RbuildError(f"{shown}: neither a docker-archive (manifest.json) nor an oci-archive (index.json)")


def _docker_images(d: _Dir) -> list[Found]:
    what = f"{d.shown}: manifest.json"
    try:
        entries = json.loads(d.read("manifest.json", ocischema.MAX_MANIFEST))
    except ValueError:
        raise RbuildError(f"{what}: not valid JSON") from None
    if not isinstance(entries, list) or not entries:
        raise RbuildError(f"{what}: not a list of images")
    found = []
    for i, e in enumerate(entries):
        where = f"{what}[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("Config"), str):
            raise RbuildError(f"{where}: no Config file named")
        tags = e.get("RepoTags") or []
        lays = e.get("Layers") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise RbuildError(f"{where}: RepoTags is not a list of names")
        if not isinstance(lays, list) or not all(isinstance(x, str) for x in lays):
            raise RbuildError(f"{where}: Layers is not a list of file names")
        config = d.read(e["Config"], ocischema.MAX_CONFIG)
        ocischema.check_config(ocischema.load(config, f"{d.shown}: {e['Config']}"), f"{d.shown}: {e['Config']}")
        files: dict[str, str] = {}
        descs = []
        for rel in lays:
            digest, size, media_type = _describe(d, rel)
            files[digest] = rel
            descs.append({"mediaType": media_type, "digest": digest, "size": size})
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        manifest = img.manifest("docker", config_digest, len(config), descs)

        def opener(digest: str, files: dict[str, str] = files) -> IO[bytes]:
            return d.open(files[digest])

        src = transports.Source(d.shown, manifest, img.canonical(manifest), config, opener)
        found.append(Found(src, tags))
    return found


def _describe(d: _Dir, rel: str) -> tuple[str, int, str]:
    """A layer file's digest, size and media type (by its first bytes: gzip, zstd or a plain tar)."""
    h = hashlib.sha256()
    n = 0
    with d.open(rel) as f:
        head = f.read(4)
        h.update(head)
        n += len(head)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    if head.startswith(_GZIP):
        media_type = img.DOCKER_LAYER_GZIP
    elif head.startswith(_ZSTD):
        media_type = img.OCI_LAYER_ZSTD
    else:
        media_type = img.DOCKER_LAYER
    return "sha256:" + h.hexdigest(), n, media_type


def _oci_images(d: _Dir, root: str) -> list[Found]:
    """Each entry of the index, read as a layout of its own: our scratch copy's index.json is rewritten to
    hold only that entry (`read_layout` reads it at once; blobs are read later, by digest)."""
    index = ocischema.load(d.read("index.json", ocischema.MAX_MANIFEST), f"{d.shown}: index.json")
    ocischema.check_index(index, f"{d.shown}: index.json")
    found = []
    index_path = os.path.join(root, "index.json")
    for desc in index["manifests"]:
        notes = desc.get("annotations") or {}
        name = notes.get(CONTAINERD_NAME) or ""
        ref = notes.get(img.REF_NAME) or ""
        if not name and ("/" in ref or ":" in ref):  # podman and buildah write the full name here
            name = ref
        os.unlink(index_path)
        with open(index_path, "x") as f:
            json.dump({"schemaVersion": 2, "manifests": [desc]}, f)
        src = transports.read_layout(root, None, d.shown, None, confined=True)
        found.append(Found(src, [name] if name else []))
    return found
