"""The local content-addressed store: blobs, unpacked layers, image records and the step cache.

Layout under the store root:
    lock, gc.lock          flock()s guarding the index and garbage collection; they live with the store
                          (not in the runtime dir) so two processes of one store always see the same lock
    (mount points live in the runtime dir, $XDG_RUNTIME_DIR/rbuild or /tmp/rbuild-$UID)
    store.json            format version and the uid/gid mapping the store was made under
    blobs/sha256/HEX      configs, manifests, compressed layer blobs
    chains/HEX/           a layer unpacked in overlay lower-dir format on top of its parent layers
                          (HEX = its chain id, see `chain_ids`)
    chains/HEX.json       what is known about it (see `Store.add_layer`)
    images.json           image records: id (config digest), local manifest digest(s), names
    cache/HEX.json        step cache: the build state after a step, keyed by the step's cache key
    tmp/                  staging; everything reaches its final place by rename
Every write is a temporary file or directory plus rename, so a crash never leaves half an entry.

Layers are keyed by chain id, not diff_id (as containers/storage does): unpacking puts directories a
layer's tar implies but does not list there with the mode and owner of the layers below (as an
applier working on the parent snapshot keeps them), so the same diff_id unpacked on other parents is
other content. Format 1 kept `layers/DIFFID/` for whichever image brought a diff_id first; `migrate`
converts such a store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rootless.errors import RbuildError
from rootless.userns import IdMap

STORE_VERSION = 2


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_HEX64 = re.compile(r"[0-9a-f]{64}")


def hex_of(digest: str) -> str:
    """The hex part of a sha256 digest; anything else (it may come from an untrusted image) is refused,
    since it becomes part of file names in the store."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not _HEX64.fullmatch(hexpart):
        raise RbuildError(f"invalid or unsupported digest {digest!r}")
    return hexpart


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain id of each layer: the first's diff_id, then sha256 of "PARENT_CHAIN DIFF_ID"."""
    out: list[str] = []
    for d in diff_ids:
        hex_of(d)
        out.append(d if not out else "sha256:" + sha256_hex(f"{out[-1]} {d}".encode()))
    return out


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def rmtree(path: str) -> None:
    """Remove a tree we made, even where a RUN step left directories without write permission."""

    def fix(func: Any, p: str, exc: Any) -> None:
        with contextlib.suppress(OSError):
            parent = os.path.dirname(p)
            os.chmod(parent, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)

    if not os.path.lexists(path):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)


@dataclass
class ImageRecord:
    id: str  # "sha256:<config digest hex>"
    manifest: str  # digest of the local manifest blob
    names: list[str] = field(default_factory=list)
    created: str = ""
    digest: str = ""  # manifest digest at the registry it was pulled from, if any
    # the local manifest each name was given with: two images with one config (so one id) may come with
    # different layer blobs, and each name pushes its own
    manifests: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "manifest": self.manifest, "names": self.names, "created": self.created,
                "digest": self.digest, "manifests": {n: m for n, m in self.manifests.items() if n in self.names}}

    def named(self, name: str) -> ImageRecord:
        """This record as `name` refers to it: with the manifest that name was given with."""
        return dataclasses.replace(self, manifest=self.manifests.get(name, self.manifest),
                                   names=list(self.names), manifests=dict(self.manifests))


class Store:
    """One store root. Cheap to open: nothing but store.json is read up front."""

    def __init__(self, root: str, runtime: str | None = None) -> None:
        self.root = root
        self.runtime = runtime  # per-user runtime dir for locks and mount points ($XDG_RUNTIME_DIR/rbuild)
        self.version = STORE_VERSION  # of the store as opened: an older one needs `migrate.upgrade`

    def runtime_path(self) -> str:
        """This store's directory for runtime state (mount points), outside the store itself."""
        if self.runtime is None:
            raise RbuildError("internal error: the store was opened without a runtime directory")
        tag = hashlib.sha256(os.path.realpath(self.root).encode()).hexdigest()[:16]
        d = os.path.join(self.runtime, tag)
        os.makedirs(d, mode=0o700, exist_ok=True)
        return d

    @contextlib.contextmanager
    def mountpoints(self) -> Iterator[str]:
        """A private directory for mount points of one step, removed afterwards."""
        path = tempfile.mkdtemp(prefix="mnt-", dir=self.runtime_path())
        try:
            yield path
        finally:
            rmtree(path)

    # -- opening -------------------------------------------------------------------------------
    def open(self, idmap: IdMap, create: bool = True) -> None:
        """Create the layout if needed and refuse a store made under another mapping."""
        meta_path = os.path.join(self.root, "store.json")
        try:
            with open(meta_path, "rb") as f:
                meta = json.load(f)
        except FileNotFoundError:
            if not create:
                return
            try:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
                for sub in ("blobs/sha256", "chains", "cache", "tmp"):
                    os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
                atomic_write(meta_path, json.dumps({"version": STORE_VERSION, "mapping": idmap.to_json()},
                                                   sort_keys=True).encode(), 0o600)
            except OSError as e:
                raise RbuildError(f"cannot create store at {self.root}: {e.strerror}") from None
            return
        except (OSError, ValueError) as e:
            raise RbuildError(f"cannot read {meta_path}: {e}") from None
        if meta.get("version") not in (1, STORE_VERSION):
            raise RbuildError(f"store {self.root} has unsupported format version {meta.get('version')}")
        self.version = meta["version"]
        recorded = IdMap.from_json(meta.get("mapping", {}))
        if recorded != idmap:
            raise RbuildError(
                f"store {self.root} was created under a different user namespace mapping "
                f"({recorded.describe()}; now {idmap.describe()}); use another --root or remove it "
                f"with the mapping it was made under"
            )
        self.sweep_staging()

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.root, "store.json"))

    def set_version(self, version: int) -> None:
        """Record the format version (the mapping stays): the last step of an upgrade."""
        meta_path = os.path.join(self.root, "store.json")
        with open(meta_path, "rb") as f:
            meta = json.load(f)
        meta["version"] = version
        atomic_write(meta_path, json.dumps(meta, sort_keys=True).encode(), 0o600)
        self.version = version

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No other build, pull or push of this store runs meanwhile (for a format upgrade); waits for them."""
        fd = os.open(os.path.join(self.root, "gc.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self.lock():
                yield
        finally:
            os.close(fd)

    # -- locking and staging ---------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def staging(self, prefix: str = "stage-") -> Iterator[str]:
        """A scratch directory inside the store (same filesystem, so results can be renamed into place).

        It holds a locked `.lock` while in use, so a later process can tell a killed build's leftovers
        (removed by sweep_staging) from a running build's work.
        """
        path = tempfile.mkdtemp(prefix=prefix, dir=os.path.join(self.root, "tmp"))
        fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            rmtree(path)
            os.close(fd)

    def sweep_staging(self, grace: float = 600.0) -> None:
        """Remove staging dirs left by killed processes: unlocked ones, or lock-less ones older than grace."""
        tmp = os.path.join(self.root, "tmp")
        try:
            names = os.listdir(tmp)
        except OSError:
            return
        for name in names:
            path = os.path.join(tmp, name)
            try:
                fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    if time.time() - os.lstat(path).st_mtime > grace:
                        rmtree(path)
                continue
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live build's
            finally:
                os.close(fd)
            rmtree(path)

    # -- blobs -----------------------------------------------------------------------------------
    def blob_dir(self) -> str:
        return os.path.join(self.root, "blobs", "sha256")

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", hex_of(digest))

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def put_blob(self, data: bytes) -> str:
        digest = "sha256:" + sha256_hex(data)
        path = self.blob_path(digest)
        if not os.path.exists(path):
            atomic_write(path, data)
        return digest

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise RbuildError(f"blob {digest} is missing from the store {self.root}") from None
        if "sha256:" + sha256_hex(data) != digest:
            raise RbuildError(f"blob {digest} in the store {self.root} is corrupt")
        return data

    def read_json(self, digest: str) -> Any:
        return json.loads(self.read_blob(digest))

    # -- layers ----------------------------------------------------------------------------------
    # Every method takes a layer's chain id (`chain_ids`), never a bare diff_id.
    def layer_dir(self, chain_id: str) -> str:
        return os.path.join(self.root, "chains", hex_of(chain_id))

    def layer_dirs(self, diff_ids: Sequence[str]) -> list[str]:
        """The directories of an image's layers, top first (overlay's lowerdir order)."""
        return [self.layer_dir(c) for c in reversed(chain_ids(diff_ids))]

    def has_layer(self, chain_id: str) -> bool:
        return os.path.exists(self.layer_dir(chain_id) + ".json")

    def layer_meta(self, chain_id: str) -> dict[str, Any]:
        try:
            with open(self.layer_dir(chain_id) + ".json", "rb") as f:
                meta: dict[str, Any] = json.load(f)
                return meta
        except FileNotFoundError:
            raise RbuildError(f"layer {chain_id} is missing from the store {self.root}") from None
        except (OSError, ValueError) as e:
            raise RbuildError(f"cannot read {self.layer_dir(chain_id)}.json: {e}") from None

    def set_layer_meta(self, chain_id: str, meta: dict[str, Any]) -> None:
        atomic_write(self.layer_dir(chain_id) + ".json", json.dumps(meta, sort_keys=True).encode())

    def add_layer(self, staged_dir: str, chain_id: str, meta: dict[str, Any]) -> None:
        """Move an unpacked layer into place; a concurrent writer of the same layer wins harmlessly.

        meta: "diff_id"; "parent" (the parent's chain id, "" for a bottom layer); "size" (tar bytes);
        "origin": "dir" when `write_tar` of the directory gives the layer's exact tar, "blob" when only a
        blob holds it; "sources": blobs verified to decompress to exactly the diff_id (for "blob" layers:
        read to rebuild the tar, never pushed in place of an image's own blob); "blobs": compressed blobs
        rbuild made of the layer ({mediaType, digest, size, level}), kept so a second push does not
        compress again.
        """
        final = self.layer_dir(chain_id)
        with self.lock():  # check, rename and mark complete as one step against concurrent builds
            if not self.has_layer(chain_id):
                if os.path.lexists(final):  # left by a crash before its .json was written (which marks completion)
                    rmtree(final)
                os.rename(staged_dir, final)
                self.set_layer_meta(chain_id, meta)
                return
        rmtree(staged_dir)

    def add_layer_blob(self, chain_id: str, blob: dict[str, Any]) -> None:
        with self.lock():
            meta = self.layer_meta(chain_id)
            blobs = [b for b in meta.get("blobs", []) if b["digest"] != blob["digest"]]
            blobs.append(blob)
            meta["blobs"] = blobs
            self.set_layer_meta(chain_id, meta)

    def add_layer_source(self, chain_id: str, digest: str) -> None:
        """Record one more blob verified to decompress to the layer's diff_id."""
        with self.lock():
            meta = self.layer_meta(chain_id)
            if digest not in meta.get("sources", []):
                meta["sources"] = [*meta.get("sources", []), digest]
                self.set_layer_meta(chain_id, meta)

    # -- images ----------------------------------------------------------------------------------
    def _images_path(self) -> str:
        return os.path.join(self.root, "images.json")

    def images(self) -> list[ImageRecord]:
        try:
            with open(self._images_path(), "rb") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise RbuildError(f"cannot read {self._images_path()}: {e}") from None
        return [ImageRecord(**r) for r in raw.get("images", [])]

    def _save_images(self, records: list[ImageRecord]) -> None:
        data = json.dumps({"images": [r.to_json() for r in records]}, indent=1, sort_keys=True).encode()
        atomic_write(self._images_path(), data, 0o600)

    def add_image(self, config: bytes, manifest: bytes, names: list[str], created: str,
                  digest: str = "") -> ImageRecord:
        """Record an image (its blobs must already be stored) and move `names` onto it."""
        image_id = "sha256:" + sha256_hex(config)
        self.put_blob(config)
        manifest_digest = self.put_blob(manifest)
        with self.lock():
            records = self.images()
            for r in records:
                r.names = [n for n in r.names if n not in names]
            rec = next((r for r in records if r.id == image_id), None)
            if rec is None:
                rec = ImageRecord(image_id, manifest_digest, [], created, digest)
                records.append(rec)
            else:
                rec.manifest = manifest_digest
                rec.digest = digest or rec.digest
            for n in names:
                if n not in rec.names:
                    rec.names.append(n)
                rec.manifests[n] = manifest_digest
            # an image that lost all its names stays (as <none>) like docker's dangling images
            self._save_images(records)
        return dataclasses.replace(rec, names=list(rec.names), manifests=dict(rec.manifests))

    def find(self, candidates: list[str]) -> ImageRecord | None:
        """The first record matching one of the names, a full id, or a unique 12+ hex prefix."""
        records = self.images()
        for cand in candidates:
            for r in records:
                if cand in r.names:
                    return r.named(cand)
        for cand in candidates:
            h = cand.removeprefix("sha256:")
            if len(h) >= 12 and all(c in "0123456789abcdef" for c in h):
                hits = [r for r in records if r.id[7:].startswith(h)]
                if len(hits) == 1:
                    return hits[0]
                if len(hits) > 1:
                    raise RbuildError(f"image id prefix {h} is ambiguous")
        return None

    def tag(self, image_id: str, name: str, manifest: str = "") -> None:
        """Give the image one more name, with `manifest` (default: the image's latest) as that name's."""
        with self.lock():
            records = self.images()
            for r in records:
                r.names = [n for n in r.names if n != name]
                if r.id == image_id:
                    r.names.append(name)
                    r.manifests[name] = manifest or r.manifest
            self._save_images(records)

    def untag(self, image_id: str, name: str | None) -> ImageRecord | None:
        """Remove one name, or (name None) the whole image record; return what is left of it."""
        with self.lock():
            records = self.images()
            left: ImageRecord | None = None
            keep = []
            for r in records:
                if r.id == image_id:
                    if name is not None:
                        r.names = [n for n in r.names if n != name]
                    if name is None or not r.names:
                        continue
                    left = r
                keep.append(r)
            self._save_images(keep)
            return left

    # -- step cache ------------------------------------------------------------------------------
    def cache_get(self, key: str) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.root, "cache", key + ".json"), "rb") as f:
                state: dict[str, Any] = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        try:
            if not all(self.has_layer(c) for c in chain_ids(state.get("layers", []))):
                return None
        except RbuildError:
            return None
        return state

    def cache_put(self, key: str, state: dict[str, Any]) -> None:
        atomic_write(os.path.join(self.root, "cache", key + ".json"), json.dumps(state, sort_keys=True).encode())


    # -- garbage collection ----------------------------------------------------------------------
    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Held (shared) by every build, pull and push: garbage collection waits for none and skips if any."""
        fd = os.open(os.path.join(self.root, "gc.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def collect_garbage(self) -> tuple[int, int] | None:
        """Remove layers, blobs and cache entries no image needs; (layers, blobs) removed, None when busy."""
        fd = os.open(os.path.join(self.root, "gc.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            with self.lock():
                keep_layers: set[str] = set()
                keep_blobs: set[str] = set()
                for r in self.images():
                    for m in {r.manifest, *r.manifests.values()}:
                        keep_blobs.add(hex_of(m))
                        with contextlib.suppress(RbuildError):  # the layer blobs each name pushes
                            keep_blobs |= {_blob_hex(d) for d in self.read_json(m).get("layers", [])}
                    keep_blobs.add(hex_of(r.id))
                    config = self.read_json(r.id)
                    keep_layers |= {hex_of(c) for c in chain_ids(config.get("rootfs", {}).get("diff_ids", []))}
                for h in keep_layers:
                    with contextlib.suppress(RbuildError):
                        meta = self.layer_meta("sha256:" + h)
                        keep_blobs |= {hex_of(b["digest"]) for b in meta.get("blobs", [])}
                        keep_blobs |= {hex_of(d) for d in meta.get("sources", [])}
                layers_dir = os.path.join(self.root, "chains")
                removed_layers = 0
                for name in os.listdir(layers_dir):
                    h = name.removesuffix(".json")
                    if h not in keep_layers:
                        if name.endswith(".json"):
                            os.unlink(os.path.join(layers_dir, name))  # the .json first: it marks completeness
                            removed_layers += 1
                for name in os.listdir(layers_dir):
                    if not name.endswith(".json") and name not in keep_layers:
                        rmtree(os.path.join(layers_dir, name))
                removed_blobs = 0
                for name in os.listdir(self.blob_dir()):
                    if name not in keep_blobs:
                        os.unlink(os.path.join(self.blob_dir(), name))
                        removed_blobs += 1
                cache_dir = os.path.join(self.root, "cache")
                for name in os.listdir(cache_dir):
                    if name.startswith("files-") or not name.endswith(".json"):
                        continue
                    path = os.path.join(cache_dir, name)
                    try:
                        with open(path, "rb") as f:
                            state = json.load(f)
                        chains = {hex_of(c) for c in chain_ids(state.get("layers", []))}
                    except (OSError, ValueError, RbuildError):
                        chains = {""}
                    if not chains <= keep_layers:
                        os.unlink(path)
                return removed_layers, removed_blobs
        finally:
            os.close(fd)


def _blob_hex(desc: dict[str, Any]) -> str:
    """A manifest descriptor's blob name in blobs/sha256 ("" for a digest that cannot be one)."""
    digest = desc.get("digest")
    ok = isinstance(digest, str) and digest.startswith("sha256:") and _HEX64.fullmatch(digest[7:])
    return digest[7:] if ok else ""  # type: ignore[index]


def now_rfc3339(epoch: float | None = None) -> str:
    t = time.time() if epoch is None else epoch
    whole = int(t)
    frac = int(round((t - whole) * 1e9))
    if frac >= 10**9:
        whole, frac = whole + 1, 0
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return base + (f".{frac:09d}".rstrip("0") if frac else "") + "Z"
