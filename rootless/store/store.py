"""The local content-addressed store: blobs, unpacked layers, image records and the step cache.

Layout under the store root:
    lock, gc.lock          flock()s guarding the index and garbage collection; they live with the store
                          (not in the runtime dir) so two processes of one store always see the same lock
    (mount points live in the runtime dir, $XDG_RUNTIME_DIR/rbuild or /tmp/rbuild-$UID)
    store.json            format version, the uid/gid mapping it was made under, its layer format, the last rung
    blobs/sha256/HEX      configs, manifests, compressed layer blobs
    chains/HEX/           a layer unpacked in the store's layer format on top of its parent layers
                          (HEX = its chain id, see `chain_ids`)
    chains/HEX.json       what is known about it (see `Store.add_layer`)
    images.json           image records: id (config digest), local manifest digest(s), names
    cache/HEX.json        step cache: the build state after a step, keyed by the step's cache key
    tmp/                  staging; everything reaches its final place by rename
Every write is a temporary file or directory plus rename, so a crash never leaves half an entry, and
each entry is written after everything it refers to (blob before image record, layer directory before
its .json, layers before the cache entries and images naming them). What a killed process leaves
(staging and mount-point directories, temporary files, a layer directory without its .json) is
removed by `sweep`, which every command that opens the store runs.

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
import functools
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rootless.blob.digest import hex_of, is_sha256_hex, sha256_of
from rootless.blob.verify import BlobMismatch, verify_bytes
from rootless.errors import RbuildError
from rootless.idmap import IdMap
from rootless.kernel.fsutil import atomic_write
from rootless.layer.format import FORMATS, LayerFormat, for_directory

STORE_VERSION = 2
LAYER_FORMAT_V2 = "overlay-userxattr"  # the layer format of stores that predate the `strategy` record


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain id of each layer: the first's diff_id, then sha256 of "PARENT_CHAIN DIFF_ID"."""
    return list(_chains(tuple(diff_ids)))


@functools.lru_cache(maxsize=256)
def _chains(diff_ids: tuple[str, ...]) -> tuple[str, ...]:
    """chain_ids, once a process for each list: a build asks again at every step that made no layer."""
    out: list[str] = []
    for d in diff_ids:
        hex_of(d)
        out.append(d if not out else sha256_of(f"{out[-1]} {d}".encode()))
    return tuple(out)


TEMP_PREFIXES = (".tmp-", ".partial-", ".lock-")  # atomic_write's, copy_verified's and the registry's


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

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):  # shutil.rmtree would open it: a FIFO blocks forever
        os.unlink(path)
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)


@contextlib.contextmanager
def _held_dir(parent: str, prefix: str) -> Iterator[str]:
    """A fresh directory that holds a locked `.lock` while in use, so `_sweep_dirs` can tell a killed
    process's leftovers from live work. The lock file gets its name only once locked, and is removed
    last: a removal cut short (by a signal) still leaves a directory the next sweep knows to be dead."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        fd = os.open(os.path.join(path, ".lock-new"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except BaseException:
        rmtree(path)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(os.path.join(path, ".lock-new"), os.path.join(path, ".lock"))
        yield path
    finally:
        with contextlib.suppress(OSError):
            for name in os.listdir(path):
                if name != ".lock":
                    rmtree(os.path.join(path, name))
        rmtree(path)
        os.close(fd)


def _sweep_dirs(parent: str, prefix: str, grace: float, all_dead: bool) -> list[str]:
    """Remove the directories under parent (named prefix*) that nobody holds: their `.lock` is not locked,
    or they have none and are older than grace; all of them when `all_dead`. Returns what was removed."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(parent, name)
        if not all_dead:
            try:
                fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                try:
                    if time.time() - os.lstat(path).st_mtime <= grace:
                        continue
                except OSError:
                    continue
            except OSError:
                continue
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process's
                finally:
                    os.close(fd)
        rmtree(path)
        removed.append(path)
    return removed


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
        return {
            "id": self.id,
            "manifest": self.manifest,
            "names": self.names,
            "created": self.created,
            "digest": self.digest,
            "manifests": {n: m for n, m in self.manifests.items() if n in self.names},
        }

    def named(self, name: str) -> ImageRecord:
        """This record as `name` refers to it: with the manifest that name was given with."""
        return dataclasses.replace(
            self,
            manifest=self.manifests.get(name, self.manifest),
            names=list(self.names),
            manifests=dict(self.manifests),
        )


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

    def mountpoints(self) -> contextlib.AbstractContextManager[str]:
        """A private directory for mount points of one step, removed afterwards (or by a later sweep)."""
        return _held_dir(self.runtime_path(), "mnt-")

    # -- opening -------------------------------------------------------------------------------
    def open(self, idmap: IdMap, create: bool = True, sweep: bool = True) -> None:
        """Create the layout if needed, refuse a store made under another mapping, sweep leftovers."""
        meta_path = os.path.join(self.root, "store.json")
        try:
            with open(meta_path, "rb") as f:
                meta = json.load(f)
        except FileNotFoundError:
            if not create:
                return
            try:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
                # held while the store is made: a concurrent build that opened it already must not take it
                # for idle and sweep this one's format probe or the temporary file of store.json
                with self.in_use():
                    for sub in ("blobs/sha256", "chains", "cache", "tmp"):
                        os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
                    fmt = for_directory(os.path.join(self.root, "tmp")).name  # once: what this filesystem holds
                    new = {"version": STORE_VERSION, "mapping": idmap.to_json(), "layer_format": fmt}
                    atomic_write(meta_path, json.dumps(new, sort_keys=True).encode(), 0o600)
            except OSError as e:
                raise RbuildError(f"cannot create store at {self.root}: {e.strerror}") from None
            return
        except (OSError, ValueError) as e:
            raise RbuildError(f"cannot read {meta_path}: {e}") from None
        self._check_meta(meta, idmap)
        self.version = meta["version"]
        if sweep and self.version == STORE_VERSION:  # an older layout is swept once `migrate` converted it
            self.sweep()

    def check_format(self) -> None:
        """Check store.json's format version only: enough for commands that never touch layer contents,
        which therefore also work on a store made under another id mapping."""
        meta = self._read_meta()
        self._check_meta(meta, None)
        self.version = meta["version"]

    def check_mapping(self, idmap: IdMap) -> None:
        """Refuse (RbuildError) a store made under another mapping: its layer files cannot be written or
        removed under this one."""
        self._check_meta(self._read_meta(), idmap)

    def _read_meta(self) -> Any:
        meta_path = os.path.join(self.root, "store.json")
        try:
            with open(meta_path, "rb") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise RbuildError(f"cannot read {meta_path}: {e}") from None

    def _check_meta(self, meta: Any, idmap: IdMap | None) -> None:
        if not isinstance(meta, dict) or meta.get("version") not in (1, STORE_VERSION):
            version = meta.get("version") if isinstance(meta, dict) else None
            raise RbuildError(f"store {self.root} has unsupported format version {version}")
        if idmap is None:
            return
        recorded = IdMap.from_json(meta.get("mapping", {}))
        if recorded != idmap:
            raise RbuildError(
                f"store {self.root} was created under a different user namespace mapping "
                f"({recorded.describe()}; now {idmap.describe()}); only images, inspect and tag work on it: "
                f"use another --root, or remove it with the mapping it was made under"
            )

    def exists(self) -> bool:
        """Whether the store was made; another user's store is an error, not an empty store."""
        try:
            os.stat(os.path.join(self.root, "store.json"))
        except FileNotFoundError:
            return False
        except PermissionError:
            raise RbuildError(f"cannot read the store {self.root}: permission denied (it is another user's)") from None
        return True

    @property
    def layer_format(self) -> LayerFormat:
        """The on-disk format of this store's layer dirs: chosen when the store was made (the format its
        filesystem can hold, `layer.format.for_directory`); stores that predate the choice are overlay's."""
        meta = self._read_meta()
        name = meta.get("layer_format") or (meta.get("strategy") or {}).get("layer_format") or LAYER_FORMAT_V2
        fmt = FORMATS.get(name)
        if fmt is None:
            raise RbuildError(f"store {self.root} holds layers in an unknown format {name!r}: use another --root")
        return fmt

    def last_rung(self) -> str | None:
        """The rung that last wrote the store ("ISOLATION + ROOTFS"), as `record_strategy` recorded it."""
        old = self._read_meta().get("strategy")
        return f"{old.get('isolation')} + {old.get('rootfs')}" if isinstance(old, dict) else None

    def record_strategy(self, strategy: dict[str, str]) -> None:
        """Record the strategy a build uses (`rbuild doctor` and `inspect` of the store show it): the rung
        that last wrote the store. Another rung may take over a store whose layer format it writes too;
        one whose format differs is refused (its layers could not be mounted or written)."""
        meta_path = os.path.join(self.root, "store.json")
        meta = self._read_meta()
        fmt = self.layer_format.name
        old = meta.get("strategy") or {}
        if fmt != strategy["layer_format"]:
            made = f" (made by the {old.get('isolation')} + {old.get('rootfs')} rung)" if old else ""
            raise RbuildError(
                f"store {self.root}{made} holds layers in the {fmt} format, which the "
                f"{strategy.get('isolation')} + {strategy.get('rootfs')} rung of this build cannot use "
                f"(it writes {strategy['layer_format']}): give this build a new store with --root"
            )
        if old != strategy or meta.get("layer_format") != fmt:
            meta["strategy"] = strategy
            meta["layer_format"] = fmt
            atomic_write(meta_path, json.dumps(meta, sort_keys=True).encode(), 0o600)

    def records(self, strategy: dict[str, str]) -> bool:
        """Whether the store records `strategy` already (record_strategy would change nothing)."""
        meta = self._read_meta()
        return bool(meta.get("strategy") == strategy and meta.get("layer_format") == strategy["layer_format"])

    def set_version(self, version: int) -> None:
        """Record the format version (the mapping stays): the last step of an upgrade."""
        meta_path = os.path.join(self.root, "store.json")
        with open(meta_path, "rb") as f:
            meta = json.load(f)
        meta["version"] = version
        atomic_write(meta_path, json.dumps(meta, sort_keys=True).encode(), 0o600)
        self.version = version

    @contextlib.contextmanager
    def exclusive_waiting(self) -> Iterator[None]:
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

    def staging(self, prefix: str = "stage-") -> contextlib.AbstractContextManager[str]:
        """A scratch directory inside the store (same filesystem, so results can be renamed into place),
        held (locked) while in use so that only a killed process's leftovers get swept."""
        return _held_dir(os.path.join(self.root, "tmp"), prefix)

    @contextlib.contextmanager
    def _try_exclusive(self) -> Iterator[bool]:
        """gc.lock taken exclusively if no build, pull or push holds it: yields whether it was."""
        fd = os.open(os.path.join(self.root, "gc.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The store to ourselves (for repairs): fails rather than wait while another process uses it."""
        with self._try_exclusive() as got:
            if not got:
                raise RbuildError(
                    f"the store {self.root} is in use by another rbuild process; try again when it has finished"
                )
            yield

    def sweep(self, idle: bool = False, grace: float = 600.0) -> list[str]:
        """Remove what killed processes left behind; returns the paths removed.

        Staging and mount-point directories nobody holds; layer directories cut off before their .json
        (add_layer writes both under the lock, so one seen alone under it is dead); and temporary files
        when no other process uses the store (`idle`: the caller holds it exclusively, else it is tried).
        """
        removed: list[str] = []
        with contextlib.ExitStack() as stack:
            if not idle:
                idle = stack.enter_context(self._try_exclusive())
            with self.lock():
                removed += _sweep_dirs(os.path.join(self.root, "tmp"), "", grace, idle)
                if idle:
                    removed += self._sweep_temp_files()
                layers_dir = os.path.join(self.root, "chains")
                with contextlib.suppress(OSError):
                    names = set(os.listdir(layers_dir))
                    for name in sorted(names):
                        if is_sha256_hex(name) and name + ".json" not in names:
                            rmtree(os.path.join(layers_dir, name))
                            removed.append(os.path.join(layers_dir, name))
            if self.runtime is not None:  # this store's own mount-point dirs: every user of them holds gc.lock
                removed += _sweep_dirs(self.runtime_path(), "mnt-", grace, idle)
        return removed

    def _sweep_temp_files(self) -> list[str]:
        removed = []
        for d in (
            self.root,
            os.path.join(self.root, "blobs"),
            self.blob_dir(),
            os.path.join(self.root, "chains"),
            os.path.join(self.root, "cache"),
        ):
            try:
                names = [n for n in os.listdir(d) if n.startswith(TEMP_PREFIXES)]
            except OSError:
                continue
            for name in names:
                path = os.path.join(d, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    rmtree(path)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                removed.append(path)
        return removed

    # -- blobs -----------------------------------------------------------------------------------
    def blob_dir(self) -> str:
        return os.path.join(self.root, "blobs", "sha256")

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", hex_of(digest))

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def blob_names(self) -> list[str]:
        """Names of the files in blobs/sha256 (temporary files aside): digests' hex, unless damaged."""
        try:
            return sorted(n for n in os.listdir(self.blob_dir()) if not n.startswith(TEMP_PREFIXES))
        except FileNotFoundError:
            return []

    def remove_blob_file(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.blob_dir(), name))

    def put_blob(self, data: bytes) -> str:
        digest = sha256_of(data)
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
        try:
            return verify_bytes(data, digest)
        except BlobMismatch:
            raise RbuildError(f"blob {digest} in the store {self.root} is corrupt") from None

    def read_json(self, digest: str) -> Any:
        return json.loads(self.read_blob(digest))

    # -- layers ----------------------------------------------------------------------------------
    # Every method takes a layer's chain id (`chain_ids`), never a bare diff_id.
    def layer_dir(self, chain_id: str) -> str:
        return os.path.join(self.root, "chains", hex_of(chain_id))

    def layer_dirs(self, diff_ids: Sequence[str]) -> list[str]:
        """The directories of an image's layers, top first (overlay's lowerdir order)."""
        return [self.layer_dir(c) for c in reversed(chain_ids(diff_ids))]

    def layers_hold_records(self, diff_ids: Sequence[str]) -> bool:
        """Some layer of the image holds an owner or device record (`user.rbuild.*`).

        A single-uid RUN over layers without any answers stat at once (sandbox.notify). A layer does not
        change, so each is scanned once and the answer kept in its .json ("records"); bottom first, as a
        base image nearly always holds one.
        """
        from rootless.layer.layers import holds_records

        for chain_id in chain_ids(diff_ids):
            held = self.layer_meta(chain_id).get("records")
            if not isinstance(held, bool):
                held = holds_records(self.layer_dir(chain_id))
                with self.lock():
                    meta = self.layer_meta(chain_id)
                    meta["records"] = held
                    self.set_layer_meta(chain_id, meta)
            if held:
                return True
        return False

    def has_layer(self, chain_id: str) -> bool:
        return os.path.exists(self.layer_dir(chain_id) + ".json")

    def layer_keys(self) -> list[str]:
        """Every complete layer (its .json written), as the key layer_dir and layer_meta take."""
        try:
            names = os.listdir(os.path.join(self.root, "chains"))
        except FileNotFoundError:
            return []
        return sorted("sha256:" + n[:-5] for n in names if n.endswith(".json") and is_sha256_hex(n[:-5]))

    def remove_layer(self, chain_id: str) -> None:
        """The .json first: without it the directory is an incomplete layer that sweep removes."""
        with self.lock():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.layer_dir(chain_id) + ".json")
            rmtree(self.layer_dir(chain_id))

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

    @staticmethod
    def _images_json(records: list[ImageRecord]) -> bytes:
        return json.dumps({"images": [r.to_json() for r in records]}, indent=1, sort_keys=True).encode()

    def _save_images(self, records: list[ImageRecord]) -> None:
        atomic_write(self._images_path(), self._images_json(records), 0o600, durable=True)

    def remove_images(self, ids: set[str]) -> None:
        with self.lock():
            self._save_images([r for r in self.images() if r.id not in ids])

    def set_aside_images(self) -> str:
        """Move an unreadable images.json out of the way (kept for hand recovery); returns its new name."""
        aside = self._images_path() + ".corrupt"
        with self.lock():
            os.replace(self._images_path(), aside)
        return aside

    def add_image(
        self, config: bytes, manifest: bytes, names: list[str], created: str, digest: str = ""
    ) -> ImageRecord:
        """Record an image (its blobs must already be stored) and move `names` onto it."""
        image_id = sha256_of(config)
        self.put_blob(config)
        manifest_digest = self.put_blob(manifest)
        with self.lock():
            records = self.images()
            before = self._images_json(records)
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
            if self._images_json(records) != before:  # a rebuild of the same image: no (synced) rewrite
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
    def cache_get(self, key: str, present: set[str] | None = None) -> dict[str, Any] | None:
        """The step cache's entry under key, if every layer it names is in the store; `present`: chain ids
        the caller has seen here already (added to as this finds more), for a caller holding the store."""
        try:
            with open(os.path.join(self.root, "cache", key + ".json"), "rb") as f:
                state: dict[str, Any] = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        seen = set() if present is None else present
        try:
            for c in chain_ids(state.get("layers", [])):
                if c not in seen:
                    if not self.has_layer(c):
                        return None
                    seen.add(c)
        except RbuildError:
            return None
        return state

    def cache_put(self, key: str, state: dict[str, Any]) -> None:
        atomic_write(os.path.join(self.root, "cache", key + ".json"), json.dumps(state, sort_keys=True).encode())

    def cache_keys(self) -> list[str]:
        """The keys of all step-cache entries."""
        try:
            names = os.listdir(os.path.join(self.root, "cache"))
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith(("files-", *TEMP_PREFIXES)))

    def cache_entry(self, key: str) -> Any:
        """An entry as stored, unchecked (cache_get hides a damaged or dangling one): raises OSError/ValueError."""
        with open(os.path.join(self.root, "cache", key + ".json"), "rb") as f:
            return json.load(f)

    def remove_cache(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, "cache", key + ".json"))

    # -- usage and limits ------------------------------------------------------------------------
    def usage(self) -> int:
        """Bytes the store occupies on disk (allocated blocks; a hard-linked file once)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
        return total

    @contextlib.contextmanager
    def build_slot(self, slots: int, waiting: Callable[[], None]) -> Iterator[None]:
        """Hold one of `slots` build slots of this store, waiting for one (`waiting` is told once)."""
        os.makedirs(os.path.join(self.root, "slots"), mode=0o700, exist_ok=True)
        told = False
        while True:
            for i in range(slots):
                fd = os.open(
                    os.path.join(self.root, "slots", f"{i}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield
                finally:
                    os.close(fd)
                return
            if not told:
                waiting()
                told = True
            time.sleep(0.2)

    def prune(self, limit: int | None) -> list[str]:
        """Free space: what no image needs (build cache, intermediate layers), then -- while the store is
        over `limit` -- images without a name, oldest first. Named images are never removed. Returns what
        was done, one line each; [] when another build holds the store (it prunes after its own build)."""
        done: list[str] = []
        got = self.collect_garbage()
        if got is None:
            return done
        if got != (0, 0):
            done.append(f"removed {got[0]} unused layers and {got[1]} unused blobs")
        if limit is None:
            for rec in sorted((r for r in self.images() if not r.names), key=lambda r: r.created):
                self.remove_images({rec.id})
                done.append(f"removed unnamed image {rec.id}")
        else:
            for rec in sorted((r for r in self.images() if not r.names), key=lambda r: r.created):
                if self.usage() <= limit:
                    break
                self.remove_images({rec.id})
                done.append(f"removed unnamed image {rec.id}")
        if done and done[-1].startswith("removed unnamed"):
            got = self.collect_garbage()
            if got:
                done.append(f"removed {got[0]} unused layers and {got[1]} unused blobs")
        return done

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
        """Remove layers, blobs and cache entries no image needs; (layers, blobs) removed, None when busy.

        Cache entries go first, then layers (.json before directory), then blobs: killed at any point, it
        leaves nothing that refers to something already gone.
        """
        with self._try_exclusive() as idle:
            if not idle:
                return None
            with self.lock():
                keep_layers: set[str] = set()
                keep_blobs: set[str] = set()
                for r in self.images():
                    try:
                        for m in {r.manifest, *r.manifests.values()}:
                            keep_blobs.add(hex_of(m))
                            with contextlib.suppress(RbuildError):  # the layer blobs each name pushes
                                keep_blobs |= {blob_name(d.get("digest")) for d in self.read_json(m).get("layers", [])}
                        keep_blobs.add(hex_of(r.id))
                        config = self.read_json(r.id)
                        keep_layers |= {hex_of(c) for c in chain_ids(config.get("rootfs", {}).get("diff_ids", []))}
                    except (RbuildError, ValueError, AttributeError) as e:
                        raise RbuildError(
                            f"cannot tell which layers are unused: image {r.id}: {e} "
                            "(`rbuild check --repair` removes broken images)"
                        ) from None
                for h in keep_layers:
                    with contextlib.suppress(RbuildError, ValueError):
                        meta = self.layer_meta("sha256:" + h)
                        keep_blobs |= {hex_of(b["digest"]) for b in meta.get("blobs", [])}
                        keep_blobs |= {hex_of(d) for d in meta.get("sources", [])}
                cache_dir = os.path.join(self.root, "cache")
                for key in self.cache_keys():
                    try:
                        state = self.cache_entry(key)
                        chains = {hex_of(c) for c in chain_ids(state.get("layers", []))}
                        kept = chains <= keep_layers
                    except (OSError, ValueError, AttributeError, TypeError, RbuildError):
                        kept = False
                    if not kept:
                        os.unlink(os.path.join(cache_dir, key + ".json"))
                layers_dir = os.path.join(self.root, "chains")
                removed_layers = 0
                for name in os.listdir(layers_dir):
                    if name.endswith(".json") and name.removesuffix(".json") not in keep_layers:
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
                return removed_layers, removed_blobs


def blob_name(digest: object) -> str:
    """A digest's file name in blobs/sha256 ("" for a value that cannot be one: data from outside)."""
    try:
        return hex_of(digest) if isinstance(digest, str) else ""
    except RbuildError:
        return ""


def now_rfc3339(epoch: float | None = None) -> str:
    t = time.time() if epoch is None else epoch
    whole = int(t)
    frac = int(round((t - whole) * 1e9))
    if frac >= 10**9:
        whole, frac = whole + 1, 0
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return base + (f".{frac:09d}".rstrip("0") if frac else "") + "Z"
