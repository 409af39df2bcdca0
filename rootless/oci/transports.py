"""Moving images between the local store and the outside: OCI layouts, archives, registries.

Import (FROM, pull): oci:DIR[:TAG], oci-archive:FILE[:TAG], registry references. Every blob is verified
against its digest, layers are unpacked once per chain into the store (diff_id verified while unpacking)
and every image's own compressed blobs are kept and named by its manifest, so pushing an image (or one
built on it) sends exactly the bytes that were pulled for it, never another image's blob for the same
diff_id.
Export (push): oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME[:TAG]], docker://REF.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, BinaryIO, ClassVar

from rootless.blob.digest import hex_of, sha256_of
from rootless.blob.verify import BlobMismatch, VerifyingReader, verify_bytes
from rootless.errors import RbuildError
from rootless.events import Reporter
from rootless.kernel.fspath import open_beneath, open_regular
from rootless.kernel.fsutil import atomic_file, atomic_write
from rootless.layer.format import FORMAT, LayerFormat
from rootless.layer.ownership import Ownership
from rootless.oci import image as img
from rootless.oci import schema as ocischema
from rootless.oci.platform import Platform, check_config_platform, choose_platform, parse_platform
from rootless.store.store import ImageRecord, Store, chain_ids, now_rfc3339

if TYPE_CHECKING:
    from rootless.registry.api import RegistryOptions

CHUNK = 1 << 20


def copy_verified(src: IO[bytes], dest: str, digest: str, size: int | None, what: str) -> None:
    """Copy a blob to dest (atomically), checking digest and size on the way."""
    try:
        with atomic_file(dest, prefix=".partial-") as out:
            shutil.copyfileobj(VerifyingReader(src, digest, size), out, CHUNK)
    except BlobMismatch:
        raise RbuildError(f"{what}: blob {digest} does not match its digest or size") from None


# ---------------------------------------------------------------------------------------------------------
# reading OCI layouts


@dataclass
class Source:
    """An image outside the store, as far as needed to import it."""

    name: str
    manifest: dict[str, Any]
    manifest_bytes: bytes
    config_bytes: bytes
    open_blob: Callable[[str], IO[bytes]]
    remote_digest: str = ""


class _Layout:
    """The files of an OCI image layout. Each is opened only if it is a regular file (a FIFO planted as
    index.json or as a blob would block the import forever); in an unpacked archive, whose members its
    maker chose, never through a symlink either."""

    def __init__(self, root: str, spec: str, confined: bool) -> None:
        self.root = root
        self.spec = spec
        self.confined = confined

    def _blob_path(self, digest: str) -> str:
        try:
            return "blobs/sha256/" + hex_of(digest)
        except RbuildError:
            raise RbuildError(f"{self.spec}: blob {digest}: only sha256 digests are supported") from None

    def _open(self, rel: str) -> BinaryIO:
        """`rel` opened for reading; FileNotFoundError when it is missing."""
        shown = f"{self.spec}: {rel}"
        try:
            if not self.confined:
                return open_regular(os.path.join(self.root, rel), shown)
            dir_fd = open_beneath(self.root, os.path.dirname(rel))
            try:
                return open_regular(os.path.basename(rel), shown, dir_fd=dir_fd, follow=False)
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise RbuildError(f"{shown}: cannot read: {e.strerror or e}") from None

    def read(self, rel: str, limit: int) -> bytes:
        """The file `rel`, refused when larger than `limit` bytes; FileNotFoundError when it is missing."""
        with self._open(rel) as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise RbuildError(f"{self.spec}: {rel} is larger than {limit} bytes")
            return f.read(limit + 1)

    def blob(self, desc: dict[str, Any], limit: int) -> bytes:
        """A manifest or config blob, verified against its (already checked) descriptor."""
        digest, size = desc["digest"], desc["size"]
        if size > limit:
            raise RbuildError(f"{self.spec}: blob {digest} is larger than {limit} bytes")
        try:
            data = self.read(self._blob_path(digest), limit)
        except FileNotFoundError:
            raise RbuildError(f"{self.spec}: blob {digest} is missing") from None
        try:
            return verify_bytes(data, digest, size)
        except BlobMismatch:
            raise RbuildError(f"{self.spec}: blob {digest} does not match its digest or size") from None

    def open_blob(self, digest: str) -> IO[bytes]:
        """A layer blob to stream (its reader verifies it)."""
        try:
            return self._open(self._blob_path(digest))
        except FileNotFoundError:
            raise RbuildError(f"{self.spec}: blob {digest} is missing") from None


def _pick_manifest(
    layout: _Layout, index: dict[str, Any], tag: str | None, want: Platform
) -> tuple[bytes, dict[str, Any], bool]:
    """The manifest `tag` names (the only one when no tag is given), the entry for `want` where several are
    one image's platforms, through nested indexes as a registry pull goes; and whether an index chose it."""
    spec = layout.spec
    manifests = index["manifests"]
    if tag:
        chosen = [m for m in manifests if m.get("annotations", {}).get(img.REF_NAME) == tag]
        if not chosen:
            raise RbuildError(f"{spec}: no image tagged {tag!r} in the layout")
    else:
        chosen = manifests
    by_platform = len(chosen) > 1 and all(isinstance(m.get("platform"), dict) for m in chosen)
    if by_platform:
        chosen = [choose_platform({"manifests": chosen}, want, f"{spec}: index.json")]
    elif not tag and len(chosen) != 1:
        refs = [m.get("annotations", {}).get(img.REF_NAME, m["digest"]) for m in manifests]
        if not refs:
            raise RbuildError(f"{spec}: the layout holds no image")
        raise RbuildError(f"{spec}: the layout holds {len(refs)} images, name one of: {', '.join(refs)}")
    desc = chosen[0]
    data = layout.blob(desc, ocischema.MAX_MANIFEST)
    doc = ocischema.load(data, f"{spec}: manifest {desc['digest']}")
    for _depth in range(3):
        if not ocischema.is_index(doc):
            break
        where = f"{spec}: index {desc['digest']}"
        ocischema.check_index(doc, where)
        desc, by_platform = choose_platform(doc, want, where), True
        data = layout.blob(desc, ocischema.MAX_MANIFEST)
        doc = ocischema.load(data, f"{spec}: manifest {desc['digest']}")
    else:
        raise RbuildError(f"{spec}: image indexes nested too deeply")
    ocischema.check_manifest(doc, f"{spec}: manifest {desc['digest']}")
    return data, doc, by_platform


def read_layout(path: str, tag: str | None, spec: str, platform: str | None, confined: bool = False) -> Source:
    """An image in the OCI layout at `path`, every document checked; `confined`: an unpacked archive.
    `platform` (`os/arch[/variant]`, None: the host's) chooses among an index's images as pulls do."""
    layout = _Layout(path, spec, confined)
    try:
        index_bytes = layout.read("index.json", ocischema.MAX_MANIFEST)
    except FileNotFoundError:
        raise RbuildError(f"{spec}: no OCI layout there (index.json missing)") from None
    index = ocischema.load(index_bytes, f"{spec}: index.json")
    ocischema.check_index(index, f"{spec}: index.json")
    want = parse_platform(platform)
    manifest_bytes, manifest, by_platform = _pick_manifest(layout, index, tag, want)
    config = layout.blob(manifest["config"], ocischema.MAX_CONFIG)
    what = f"{spec}: config {manifest['config']['digest']}"
    ocischema.check_config(ocischema.load(config, what), what)
    if platform and not by_platform:
        check_config_platform(config, want, spec)
    return Source(spec, manifest, manifest_bytes, config, layout.open_blob)


def split_spec(rest: str) -> tuple[str, str | None]:
    """ "DIR:TAG" -> (DIR, TAG); a path containing ':' only splits on its last component."""
    if ":" in rest:
        head, _, tag = rest.rpartition(":")
        if head and "/" not in tag:
            return head, tag or None
    return rest, None


class Transport:
    """Where an image lives outside the store, named by a spec such as `oci:DIR:TAG`; `parse_transport`
    chooses the class. `local`: a directory or file here, whose images get no name in the store and no
    pull policy (a registry's do)."""

    prefix: ClassVar[str] = ""
    local: ClassVar[bool] = True

    def __init__(self, rest: str) -> None:
        self.rest = rest

    @property
    def spec(self) -> str:
        return self.prefix + self.rest

    def open(
        self, store: Store, options: RegistryOptions | None = None, reporter: Reporter | None = None
    ) -> contextlib.AbstractContextManager[Source]:
        """The image, verified, as far as needed to import it (a context: an archive is unpacked meanwhile)."""
        raise RbuildError(f"{self.spec}: images cannot be read from {self.prefix}")

    def export(
        self,
        store: Store,
        record: ImageRecord,
        fmt: str,
        compression: str | None,
        level: int | None,
        options: RegistryOptions | None = None,
        reporter: Reporter | None = None,
    ) -> str:
        """Write the image here; returns the manifest digest written (a registry push reports its blobs'
        Transfer events to reporter)."""
        raise NotImplementedError


class OCILayout(Transport):
    """`oci:DIR[:TAG]`: an OCI image layout directory."""

    prefix = "oci:"

    @contextlib.contextmanager
    def open(
        self, store: Store, options: RegistryOptions | None = None, reporter: Reporter | None = None
    ) -> Iterator[Source]:
        path, tag = split_spec(self.rest)
        yield read_layout(os.path.abspath(path), tag, self.spec, options.platform if options else None)

    def export(
        self,
        store: Store,
        record: ImageRecord,
        fmt: str,
        compression: str | None,
        level: int | None,
        options: RegistryOptions | None = None,
        reporter: Reporter | None = None,
    ) -> str:
        exp = prepare_export(store, record, fmt, compression or "gzip", level)
        path, tag = split_spec(self.rest)
        _write_layout(os.path.abspath(path), exp, tag, link=True)
        return exp.manifest_digest


class OCIArchive(Transport):
    """`oci-archive:FILE[:TAG]`: an OCI layout in a tar file, unpacked by the layer unpacker (with its limits)."""

    prefix = "oci-archive:"

    @contextlib.contextmanager
    def open(
        self, store: Store, options: RegistryOptions | None = None, reporter: Reporter | None = None
    ) -> Iterator[Source]:
        path, tag = split_spec(self.rest)
        with store.staging("archive-") as tmp:
            from rootless.layer.layers import unpack_archive

            unpack_archive(path, tmp, (os.getuid(), os.getgid()), self.spec)
            yield read_layout(tmp, tag, self.spec, options.platform if options else None, confined=True)

    def export(
        self,
        store: Store,
        record: ImageRecord,
        fmt: str,
        compression: str | None,
        level: int | None,
        options: RegistryOptions | None = None,
        reporter: Reporter | None = None,
    ) -> str:
        exp = prepare_export(store, record, fmt, compression or "gzip", level)
        path, tag = split_spec(self.rest)
        _write_oci_archive(os.path.abspath(path), exp, tag)
        return exp.manifest_digest


class DockerArchive(Transport):
    """`docker-archive:FILE[:NAME[:TAG]]`: `docker save`'s format (written only)."""

    prefix = "docker-archive:"

    def export(
        self,
        store: Store,
        record: ImageRecord,
        fmt: str,
        compression: str | None,
        level: int | None,
        options: RegistryOptions | None = None,
        reporter: Reporter | None = None,
    ) -> str:
        exp = prepare_export(store, record, "docker", compression or "gzip", level)
        path, _, name = self.rest.partition(":")
        tags = [name] if name else [n for n in record.names if "@" not in n][:1]
        tags = [t if ":" in t.rsplit("/", 1)[-1] else t + ":latest" for t in tags]
        _write_docker_archive(store, os.path.abspath(path), exp, tags)
        return exp.manifest_digest


class RegistryTransport(Transport):
    """`[docker://]REF`: a registry; a short name means what registries.conf makes of it."""

    prefix = "docker://"
    local = False

    @contextlib.contextmanager
    def open(
        self, store: Store, options: RegistryOptions | None = None, reporter: Reporter | None = None
    ) -> Iterator[Source]:
        from rootless.registry import api as registry

        options = options or registry.RegistryOptions()
        client = registry.Registry(options)
        remote = client.resolve_any(registry.resolve_names(self.rest, options))
        manifest = json.loads(remote.manifest)
        layers = [d for d in remote.layers if not store.has_blob(d.digest)]
        client.fetch_blobs(remote.ref, layers, os.path.join(store.root, "blobs"), reporter)

        def opener(digest: str) -> IO[bytes]:
            return open(store.blob_path(digest), "rb")

        # the digest a registry serves for the name (an index's, for multi-platform images): --pull=newer compares it
        digest = remote.index_digest or remote.manifest_digest
        yield Source(str(remote.ref), manifest, remote.manifest, remote.config, opener, digest)

    def export(
        self,
        store: Store,
        record: ImageRecord,
        fmt: str,
        compression: str | None,
        level: int | None,
        options: RegistryOptions | None = None,
        reporter: Reporter | None = None,
    ) -> str:
        exp = prepare_export(store, record, fmt, compression or "gzip", level)
        config_type = img.DOCKER_CONFIG if fmt == "docker" else img.OCI_CONFIG
        return self.push(exp.manifest, exp.manifest_media_type, config_type, exp.config, exp.layers, options, reporter)

    def push(
        self,
        manifest: bytes,
        media_type: str,
        config_type: str,
        config: bytes,
        layers: list[Blob],
        options: RegistryOptions | None = None,
        reporter: Reporter | None = None,
    ) -> str:
        """Push a manifest with its config (of media type `config_type`) and layer blobs from the store;
        returns the manifest digest (images and rbuild's registry cache alike)."""
        from rootless.oci.reference import parse_reference
        from rootless.registry import api as registry

        ref = parse_reference(self.rest)
        client = registry.Registry(options or registry.RegistryOptions())
        config_desc = registry.Descriptor(config_type, sha256_of(config), len(config))

        def opener(p: str) -> Callable[[], BinaryIO]:
            return lambda: open(p, "rb")

        layer_list = [
            (
                registry.Descriptor(b.descriptor["mediaType"], b.descriptor["digest"], b.descriptor["size"]),
                opener(b.path),
            )
            for b in layers
        ]
        return client.push(ref, manifest, media_type, config_desc, config, layer_list, reporter)


_TRANSPORTS: tuple[type[Transport], ...] = (OCILayout, OCIArchive, DockerArchive, RegistryTransport)


def parse_transport(spec: str) -> Transport:
    """The transport `spec` names by its prefix; anything without one is a registry reference."""
    for cls in _TRANSPORTS:
        if spec.startswith(cls.prefix):
            return cls(spec[len(cls.prefix) :])
    return RegistryTransport(spec)


def remote_digest(spec: str, options: Any) -> str | None:
    """The registry's current manifest digest for a reference (--pull=newer), None when unreachable."""
    from rootless.registry import api as registry

    try:
        ref = registry.resolve_names(spec, options)[0]
        return registry.Registry(options or registry.RegistryOptions()).remote_digest(ref)
    except RbuildError:
        return None


def import_image(
    store: Store, source: Source, names: list[str], ownership: Ownership, progress: Callable[[str], None] | None = None
) -> ImageRecord:
    """Unpack a source's layers into the store (each chain once), keep its own blobs, record the image."""
    config = json.loads(source.config_bytes)
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    descs = source.manifest.get("layers", [])
    if len(diff_ids) != len(descs):
        raise RbuildError(f"{source.name}: the config lists {len(diff_ids)} layers, the manifest {len(descs)}")
    chains = chain_ids(diff_ids)
    for i, (desc, diff_id, chain) in enumerate(zip(descs, diff_ids, chains, strict=True)):
        digest = desc["digest"]
        if not store.has_blob(digest):  # the image's own blob, even where the layer is unpacked already
            with source.open_blob(digest) as src:
                copy_verified(src, store.blob_path(digest), digest, desc.get("size"), source.name)
        if not store.has_layer(chain):
            if progress:
                progress(f"unpacking layer {digest[:19]}")
            with store.staging("unpack-") as tmp:
                target = os.path.join(tmp, "diff")
                os.mkdir(target, 0o755)
                size = unpack_blob(
                    store.blob_path(digest),
                    digest,
                    target,
                    diff_id,
                    store.layer_dirs(diff_ids[:i]),
                    ownership,
                    f"{source.name}: ",
                    store.layer_format,
                )
                store.add_layer(
                    target,
                    chain,
                    {
                        "diff_id": diff_id,
                        "parent": chains[i - 1] if i else "",
                        "size": size,
                        "origin": "blob",
                        "sources": [digest],
                        "blobs": [],
                    },
                )
        elif digest not in store.layer_meta(chain).get("sources", []):
            verify_blob(store.blob_path(digest), digest, diff_id)
            store.add_layer_source(chain, digest)
    manifest = img.manifest("oci", sha256_of(source.config_bytes), len(source.config_bytes), descs)
    return store.add_image(
        source.config_bytes, img.canonical(manifest), names, config.get("created", now_rfc3339()), source.remote_digest
    )


def unpack_blob(
    path: str,
    name: str,
    target: str,
    diff_id: str,
    lowers: list[str],
    ownership: Ownership,
    where: str = "",
    fmt: LayerFormat = FORMAT,
) -> int:
    """Unpack the layer blob `name` at path into target on top of lowers (top first); returns its tar size.

    The tar must be diff_id; `where` prefixes that error (the image's name); `fmt`: the store's layer format.
    """
    from rootless.layer import layers

    with layers.open_blob(path, name=name) as raw:
        reader = VerifyingReader(raw, diff_id)
        try:
            layers.unpack(reader, target, lowers=lowers, ownership=ownership, fmt=fmt)
            reader.drain()
        except BlobMismatch:
            raise RbuildError(f"{where}layer {name} does not match its diff_id {diff_id}") from None
    return reader.verifier.count


def verify_blob(path: str, digest: str, diff_id: str) -> None:
    """Check that a blob decompresses to exactly diff_id (LayerError if not): read to its end."""
    from rootless.layer import layers

    with layers.open_blob(path, digest=digest, diff_id=diff_id) as f:
        while f.read(CHUNK):
            pass


def complete(store: Store, rec: ImageRecord) -> bool:
    """Every layer of the image is unpacked in the store."""
    diff_ids = store.read_json(rec.id).get("rootfs", {}).get("diff_ids", [])
    return all(store.has_layer(c) for c in chain_ids(diff_ids))


# ---------------------------------------------------------------------------------------------------------
# exporting


@dataclass
class Blob:
    descriptor: dict[str, Any]
    path: str


def layer_blob(
    store: Store, diff_id: str, chain: str, own: dict[str, Any] | None, fmt: str, compression: str, level: int | None
) -> Blob:
    """The blob an image pushes for one layer: `own`, the one its manifest names (pulled with it or with its
    base image), when that has the compression asked for; else one rbuild compresses from the layer's
    exact tar, made once and kept (a second push does not compress again)."""
    want = img.layer_media_type(fmt, compression)
    if own is not None and img.compression_of(str(own.get("mediaType", ""))) == compression:
        with contextlib.suppress(RbuildError):
            if store.has_blob(own["digest"]):
                path = store.blob_path(own["digest"])
                return Blob({"mediaType": want, "digest": own["digest"], "size": os.path.getsize(path)}, path)
    meta = store.layer_meta(chain)
    for b in meta.get("blobs", []):
        if (img.compression_of(b["mediaType"]), b.get("level")) == (compression, level) and store.has_blob(b["digest"]):
            return Blob({"mediaType": want, "digest": b["digest"], "size": b["size"]}, store.blob_path(b["digest"]))
    from rootless.blob import compress

    with store.staging("compress-") as tmp:
        out = os.path.join(tmp, "blob")
        if meta.get("origin") == "dir":
            digest, size, got_diff = compress.compress_layer(store.layer_dir(chain), out, compression, level)
        else:
            digest, size, got_diff = compress.compress_file(tar_source(store, meta, own), out, compression, level)
        if got_diff != diff_id:
            raise RbuildError(
                f"layer {diff_id} no longer reproduces its content (got {got_diff}); the store is damaged"
            )
        final = store.blob_path(digest)
        if not os.path.exists(final):
            os.rename(out, final)
    store.add_layer_blob(chain, {"mediaType": want, "digest": digest, "size": size, "level": level})
    return Blob({"mediaType": want, "digest": digest, "size": size}, final)


def tar_source(store: Store, meta: dict[str, Any], own: dict[str, Any] | None) -> str:
    """A stored blob that decompresses to the layer's exact tar: the image's own, else a verified source."""
    for digest in ([own.get("digest")] if own else []) + list(meta.get("sources", [])):
        with contextlib.suppress(RbuildError):
            if isinstance(digest, str) and store.has_blob(digest):
                return store.blob_path(digest)
    raise RbuildError(f"layer {meta.get('diff_id')}: no blob holding its tar is left in the store {store.root}")


@dataclass
class Export:
    """An image ready to be written: manifest, config and layer blobs."""

    manifest: bytes
    manifest_media_type: str
    config: bytes
    config_digest: str
    layers: list[Blob]

    @property
    def manifest_digest(self) -> str:
        return sha256_of(self.manifest)


def prepare_export(store: Store, record: ImageRecord, fmt: str, compression: str, level: int | None) -> Export:
    if fmt == "docker" and compression == "zstd":
        raise RbuildError("the docker image format has no zstd layers: use --format oci or --compression-format gzip")
    config = store.read_blob(record.id)
    diff_ids = json.loads(config).get("rootfs", {}).get("diff_ids", [])
    own: list[dict[str, Any] | None] = list(store.read_json(record.manifest).get("layers", []))
    if len(own) != len(diff_ids):
        own = [None] * len(diff_ids)
    jobs = list(zip(diff_ids, chain_ids(diff_ids), own, strict=True))

    def one(job: tuple[str, str, dict[str, Any] | None]) -> Blob:
        return layer_blob(store, *job, fmt, compression, level)

    workers = min(len(jobs), len(os.sched_getaffinity(0)))
    if workers <= 1:
        blobs = [one(j) for j in jobs]
    else:  # the compressors (ISA-L, zlib, zstd) and hashlib release the GIL: one layer per core at once
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            blobs = list(pool.map(one, jobs))
    man = img.manifest(fmt, record.id, len(config), [b.descriptor for b in blobs])
    return Export(img.canonical(man), man["mediaType"], config, record.id, blobs)


def _write_layout(path: str, exp: Export, tag: str | None, link: bool) -> None:
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    layout = os.path.join(path, "oci-layout")
    if not os.path.exists(layout):
        atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}')

    def put(data_or_path: bytes | str, digest: str) -> None:
        dest = os.path.join(path, "blobs", "sha256", hex_of(digest))
        if os.path.exists(dest):
            return
        if isinstance(data_or_path, bytes):
            atomic_write(dest, data_or_path)
            return
        if link:
            try:
                os.link(data_or_path, dest)  # atomic by itself: the name appears with the whole file
                return
            except FileExistsError:
                return
            except OSError:
                pass
        with atomic_file(dest, prefix=".partial-") as out, open(data_or_path, "rb") as src:
            shutil.copyfileobj(src, out, CHUNK)

    for b in exp.layers:
        put(b.path, b.descriptor["digest"])
    put(exp.config, exp.config_digest)
    put(exp.manifest, exp.manifest_digest)
    index_path = os.path.join(path, "index.json")
    try:
        with open_regular(index_path, index_path) as f:
            index = ocischema.load(f.read(ocischema.MAX_MANIFEST + 1), index_path)
        ocischema.check_index(index, index_path)
    except FileNotFoundError:
        index = {"schemaVersion": 2, "mediaType": img.OCI_INDEX, "manifests": []}
    except OSError as e:
        raise RbuildError(f"cannot read {index_path}: {e.strerror or e}") from None
    desc: dict[str, Any] = {
        "mediaType": exp.manifest_media_type,
        "digest": exp.manifest_digest,
        "size": len(exp.manifest),
    }
    if tag:
        desc["annotations"] = {img.REF_NAME: tag}
        index["manifests"] = [
            m for m in index.get("manifests", []) if m.get("annotations", {}).get(img.REF_NAME) != tag
        ]
    else:
        index["manifests"] = [m for m in index.get("manifests", []) if m.get("digest") != exp.manifest_digest]
    index["manifests"].append(desc)
    atomic_write(index_path, json.dumps(index, sort_keys=True).encode())


def tar_add(tf: tarfile.TarFile, name: str, data: bytes | None = None, path: str | None = None) -> None:
    """Add a file (bytes or a path) or, with neither, a directory to an image archive: mode 0644/0755,
    mtime 0, no owner names, so archives of one image are byte-identical."""
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    if data is not None:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    elif path is not None:
        info.size = os.path.getsize(path)
        with open(path, "rb") as f:
            tf.addfile(info, f)
    else:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tf.addfile(info)


def _atomic_tar(path: str, write: Callable[[tarfile.TarFile], None]) -> None:
    with atomic_file(path, prefix=".partial-") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        write(tf)


def _write_oci_archive(path: str, exp: Export, tag: str | None) -> None:
    def write(tf: tarfile.TarFile) -> None:
        tar_add(tf, "blobs")
        tar_add(tf, "blobs/sha256")
        seen = set()
        for b in exp.layers:
            if b.descriptor["digest"] not in seen:
                seen.add(b.descriptor["digest"])
                tar_add(tf, "blobs/sha256/" + hex_of(b.descriptor["digest"]), path=b.path)
        tar_add(tf, "blobs/sha256/" + hex_of(exp.config_digest), data=exp.config)
        tar_add(tf, "blobs/sha256/" + hex_of(exp.manifest_digest), data=exp.manifest)
        desc: dict[str, Any] = {
            "mediaType": exp.manifest_media_type,
            "digest": exp.manifest_digest,
            "size": len(exp.manifest),
        }
        if tag:
            desc["annotations"] = {img.REF_NAME: tag}
        index = {"schemaVersion": 2, "mediaType": img.OCI_INDEX, "manifests": [desc]}
        tar_add(tf, "index.json", data=json.dumps(index, sort_keys=True).encode())
        tar_add(tf, "oci-layout", data=b'{"imageLayoutVersion":"1.0.0"}')

    _atomic_tar(path, write)


def _write_docker_archive(store: Store, path: str, exp: Export, repo_tags: list[str]) -> None:
    """`docker load` format: manifest.json, the config as HEX.json, uncompressed layer tars."""
    from rootless.layer import layers

    diff_ids = json.loads(exp.config)["rootfs"]["diff_ids"]

    def write(tf: tarfile.TarFile) -> None:
        layer_names = []
        with store.staging("dockerarchive-") as tmp:
            for diff_id, chain, blob in zip(diff_ids, chain_ids(diff_ids), exp.layers, strict=True):
                name = hex_of(diff_id) + "/layer.tar"
                if name in layer_names:
                    continue
                out = os.path.join(tmp, "layer.tar")
                if store.layer_meta(chain).get("origin") == "blob":  # the tar is the exported blob's content
                    with layers.open_blob(blob.path, diff_id=diff_id) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                else:
                    with open(out, "wb") as dst:
                        layers.write_tar(store.layer_dir(chain), dst)
                tar_add(tf, hex_of(diff_id))
                tar_add(tf, name, path=out)
                os.unlink(out)
                layer_names.append(name)
        config_name = hex_of(exp.config_digest) + ".json"
        tar_add(tf, config_name, data=exp.config)
        manifest = [{"Config": config_name, "RepoTags": repo_tags, "Layers": layer_names}]
        tar_add(tf, "manifest.json", data=json.dumps(manifest).encode())
        if repo_tags:
            repos: dict[str, dict[str, str]] = {}
            for t in repo_tags:
                repo, _, tg = t.rpartition(":")
                repos.setdefault(repo, {})[tg] = hex_of(diff_ids[-1]) if diff_ids else ""
            tar_add(tf, "repositories", data=json.dumps(repos).encode())

    _atomic_tar(path, write)
