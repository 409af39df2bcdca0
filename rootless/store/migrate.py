"""Converting a store made by an older rbuild (format 1) to the current format (2), once, in place.

Format 1 kept each layer once per diff_id (``layers/DIFFID/`` and ``layers/DIFFID.json``), unpacked on
top of the lower layers of whichever image brought that diff_id first, so its directory may hold another
image's view of the parent directories its tar leaves out. Format 2 keys layers by chain id
(``chains/CHAIN/``, see `store.chain_ids`). No format-1 directory is reused as it is: every layer an
image record needs is unpacked again on top of that image's own parent layers, from the layer's exact
tar, taken from (first that works)

* for a layer built here (format 1 "origin": "dir"): the tar its directory gives (`layers.write_tar`, a
  function of the directory), which must still be the diff_id;
* the image's own blob (the one its manifest names);
* the blobs format 1 recorded for the diff_id (the first importer's, and compressions rbuild made),
  each verified to decompress to exactly the diff_id, trailing bytes refused.

The new tree is built under tmp/ and renamed to chains/ only when complete; then the step cache is
emptied (a step may have run on another image's view of its parent directories), store.json says
format 2 and layers/ is removed. A crash before that rename leaves the format-1 store as it was (the
staging directory is swept); after it, the next open finishes the rest. An image whose layer has no
usable tar keeps its record, without that layer: a FROM pulls it again (`transports.complete`). Runs
inside the user namespace (the files belong to subordinate ids), holding the store exclusively.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from rootless.blob.digest import hex_of
from rootless.errors import RbuildError
from rootless.kernel.fsutil import atomic_write
from rootless.layer import layers
from rootless.layer.ownership import Ownership
from rootless.oci.transports import unpack_blob
from rootless.store.store import STORE_VERSION, ImageRecord, Store, chain_ids, rmtree


def upgrade(store: Store, ownership: Ownership) -> None:
    """Convert a format-1 store (see the module docstring); nothing to do if another process did."""
    with store.exclusive_waiting():
        with open(os.path.join(store.root, "store.json"), "rb") as f:
            if json.load(f).get("version") == STORE_VERSION:
                store.version = STORE_VERSION
                return
        final = os.path.join(store.root, "chains")
        if not os.path.isdir(final):
            with store.staging("upgrade-") as tmp:
                new = os.path.join(tmp, "chains")
                os.mkdir(new, 0o700)
                failed: set[str] = set()
                for rec in store.images():
                    _convert_image(store, rec, new, tmp, ownership, failed)
                os.rename(new, final)
        cache = os.path.join(store.root, "cache")
        for name in os.listdir(cache):
            if name.endswith(".json") and not name.startswith("files-"):  # files-*: context file digests
                os.unlink(os.path.join(cache, name))
        store.set_version(STORE_VERSION)
        rmtree(os.path.join(store.root, "layers"))


def _convert_image(store: Store, rec: ImageRecord, new: str, tmp: str, ownership: Ownership, failed: set[str]) -> None:
    """Unpack the image's layers into `new`, bottom up, stopping at the first that has no usable tar."""
    try:
        diff_ids = store.read_json(rec.id).get("rootfs", {}).get("diff_ids", [])
        descs = store.read_json(rec.manifest).get("layers", [])
        chains = chain_ids(diff_ids)
    except (RbuildError, ValueError):
        return  # a record format 1 could not use either
    if len(descs) != len(diff_ids):
        descs = [None] * len(diff_ids)
    for i, (diff_id, chain, own) in enumerate(zip(diff_ids, chains, descs, strict=True)):
        meta_path = os.path.join(new, hex_of(chain) + ".json")
        if os.path.exists(meta_path):
            continue
        if chain in failed:
            return
        target = os.path.join(new, hex_of(chain))
        lowers = [os.path.join(new, hex_of(c)) for c in reversed(chains[:i])]
        meta = _convert_layer(store, diff_id, own, target, lowers, tmp, ownership)
        if meta is None:
            failed.add(chain)
            return
        meta["parent"] = chains[i - 1] if i else ""
        atomic_write(meta_path, json.dumps(meta, sort_keys=True).encode())


def _convert_layer(
    store: Store,
    diff_id: str,
    own: dict[str, Any] | None,
    target: str,
    lowers: list[str],
    tmp: str,
    ownership: Ownership,
) -> dict[str, Any] | None:
    """Unpack one layer into target from the first source that gives exactly diff_id; its metadata, or None."""
    old_dir = os.path.join(store.root, "layers", hex_of(diff_id))
    try:
        with open(old_dir + ".json", "rb") as f:
            old: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        old = {}
    old_blobs = [b for b in old.get("blobs", []) if isinstance(b, dict)]
    made = [b for b in old_blobs if not b.get("original")]  # compressions rbuild made: kept for push
    if old.get("origin") == "dir":
        tar = os.path.join(tmp, "layer.tar")
        try:
            with open(tar, "wb") as f:
                got, size = layers.write_tar(old_dir, f)
            if got == diff_id:
                _fresh(target)
                unpack_blob(tar, diff_id, target, diff_id, lowers, ownership)
                if layers.write_tar(target, None)[0] == diff_id:
                    return {"diff_id": diff_id, "size": size, "origin": "dir", "sources": [], "blobs": made}
        except RbuildError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tar)
    candidates = ([own.get("digest")] if own else []) + [b.get("digest") for b in old_blobs]
    for digest in candidates:
        try:
            if not isinstance(digest, str) or not store.has_blob(digest):
                continue
            _fresh(target)
            size = unpack_blob(store.blob_path(digest), digest, target, diff_id, lowers, ownership)
        except RbuildError:
            continue
        return {"diff_id": diff_id, "size": size, "origin": "blob", "sources": [digest], "blobs": made}
    rmtree(target)
    return None


def _fresh(path: str) -> None:
    """An empty directory at path (what a failed attempt left is removed)."""
    rmtree(path)
    os.mkdir(path, 0o755)
