"""`rbuild check`: verify everything in the store; `--repair` removes what is broken.

Checked in dependency order, so that whatever refers to something broken is reported broken too and
one repair pass leaves a store that checks clean:
  blobs    each file's sha256 is its name;
  layers   (keyed by chain id) the .json is readable, the directory exists, and its content is still the layer: a layer
           rbuild made reproduces its diff_id through the deterministic tar writer; a pulled one is
           unpacked again from a source blob (which must be sound) on its parent layers and both trees must write the
           same tar stream (the original tar's own byte layout is not reproducible from a directory);
  images   config and manifest blobs are present and sound, the manifest names the config, every
           layer of the config is present and sound;
  cache    each entry is readable and its layers are present and sound.
What killed processes leave behind is not a problem: `Store.sweep` removes it.
Runs inside the user namespace: layer files belong to the mapped ids.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rootless.blob.digest import is_sha256_hex
from rootless.blob.verify import BlobMismatch, VerifyingReader
from rootless.errors import RbuildError
from rootless.layer.ownership import Ownership
from rootless.store.store import Store, blob_name, chain_ids


@dataclass(frozen=True)
class Problem:
    kind: str  # "blob", "layer", "image", "cache" or "index"
    name: str  # a blob's file name, a layer key, an image id, a cache key, or the index file
    why: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.why}"


def _check_blobs(store: Store) -> list[Problem]:
    out = []
    for name in store.blob_names():
        path = os.path.join(store.blob_dir(), name)
        try:
            if os.path.islink(path) or not os.path.isfile(path):
                out.append(Problem("blob", name, "not a regular file"))
                continue
            if not is_sha256_hex(name):
                out.append(Problem("blob", name, "corrupt (its name is not a sha256 digest)"))
                continue
            with open(path, "rb") as f, VerifyingReader(f, f"sha256:{name}") as blob:
                blob.drain()
        except OSError as e:
            out.append(Problem("blob", name, f"unreadable ({e.strerror})"))
        except BlobMismatch:
            out.append(Problem("blob", name, f"corrupt (its content is {blob.verifier.got})"))
    return out


def _lowers(store: Store, meta: dict[str, Any]) -> list[str] | None:
    """The directories a layer was unpacked on, top first (its parent chain), or None when one is missing."""
    out: list[str] = []
    parent = meta.get("parent", "")
    seen: set[str] = set()
    while parent:
        if not isinstance(parent, str) or parent in seen or not store.has_layer(parent):
            return None
        seen.add(parent)
        out.append(store.layer_dir(parent))
        parent = store.layer_meta(parent).get("parent", "")
    return out


def _layer_problem(store: Store, key: str, blob_ok: Callable[[object], bool], ownership: Ownership) -> str | None:
    """Why the layer (keyed by its chain id) is broken, or None."""
    from rootless.layer import layers

    try:
        meta = store.layer_meta(key)
        diff_id = meta["diff_id"]
        origin = meta.get("origin")
    except (RbuildError, ValueError, AttributeError, KeyError, TypeError) as e:
        return f"its metadata is unreadable ({e})"
    path = store.layer_dir(key)
    if os.path.islink(path) or not os.path.isdir(path):
        return "its directory is missing"
    try:
        tree, _ = layers.write_tar(path, None)
    except RbuildError as e:
        return f"its directory cannot be read ({e})"
    if tree == diff_id:
        return None
    if origin != "blob":
        return f"its content no longer matches its diff_id (it is now {tree})"
    sources = meta.get("sources")
    sound = [d for d in sources if blob_ok(d)] if isinstance(sources, list) else []
    if not sound:
        return "no sound blob holds its original tar"
    try:
        lowers = _lowers(store, meta)
    except (RbuildError, ValueError, AttributeError) as e:
        return f"its parent layers are unreadable ({e})"
    if lowers is None:
        return "a parent layer is missing"
    try:
        with store.staging("check-") as tmp:
            target = os.path.join(tmp, "diff")
            os.mkdir(target, 0o755)
            with layers.open_blob(store.blob_path(sound[0]), diff_id=diff_id) as raw:
                layers.unpack(raw, target, lowers=lowers, ownership=ownership)
            if layers.write_tar(target, None)[0] == tree:
                return None
    except RbuildError as e:
        return f"its original blob cannot be unpacked ({e})"
    return "its directory differs from its original blob's content"


def check(store: Store, ownership: Ownership) -> list[Problem]:
    """Every inconsistency in the store, one Problem each (empty: the store is sound)."""
    problems = _check_blobs(store)
    bad_blobs = {p.name for p in problems}

    def blob_ok(digest: object) -> bool:
        name = blob_name(digest)
        return bool(name) and name not in bad_blobs and store.has_blob(f"sha256:{name}")

    try:
        images = store.images()
    except RbuildError as e:
        problems.append(Problem("index", "images.json", str(e)))
        images = []
    cache: dict[str, Any] = {}
    for key in store.cache_keys():
        try:
            cache[key] = store.cache_entry(key)
        except (OSError, ValueError) as e:
            problems.append(Problem("cache", key, f"unreadable ({e})"))

    bad_layers = set()
    for key in store.layer_keys():
        why = _layer_problem(store, key, blob_ok, ownership)
        if why is not None:
            problems.append(Problem("layer", key, why))
            bad_layers.add(key)

    def layers_ok(diff_ids: Any) -> str | None:
        """The first layer (diff_id) of the list that is missing or broken, None when all are sound."""
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            return "(malformed layer list)"
        ids: list[str] = diff_ids
        try:
            chains = chain_ids(ids)
        except RbuildError:
            return "(invalid digest)"
        for d, c in zip(ids, chains, strict=True):
            if c in bad_layers or not store.has_layer(c):
                return d
        return None

    for r in images:
        why = None
        if not blob_ok(r.id):
            why = f"its config blob {r.id} is missing or corrupt"
        elif not blob_ok(r.manifest):
            why = f"its manifest blob {r.manifest} is missing or corrupt"
        else:
            try:
                config = store.read_json(r.id)
                manifest = store.read_json(r.manifest)
                diff_ids = config["rootfs"]["diff_ids"]
                if manifest["config"]["digest"] != r.id:
                    why = f"its manifest names another config ({manifest['config']['digest']})"
                else:
                    missing = layers_ok(diff_ids)
                    if missing:
                        why = f"its layer {missing} is missing or broken"
            except (RbuildError, ValueError, KeyError, TypeError) as e:
                why = f"its config or manifest is malformed ({e})"
        if why is not None:
            problems.append(Problem("image", r.id, why))

    for key, state in cache.items():
        layers_of = state.get("layers") if isinstance(state, dict) else None
        if not isinstance(layers_of, list) or not isinstance(state.get("config"), dict):
            problems.append(Problem("cache", key, "malformed entry"))
            continue
        missing = layers_ok(layers_of)
        if missing:
            problems.append(Problem("cache", key, f"its layer {missing} is missing or broken"))
    return problems


def repair(store: Store, problems: list[Problem]) -> list[str]:
    """Remove everything the problems name (the caller holds the store exclusively); one line each."""
    done = []
    images = {p.name for p in problems if p.kind == "image"}
    if images:
        store.remove_images(images)
    for p in problems:
        if p.kind == "blob":
            store.remove_blob_file(p.name)
        elif p.kind == "layer":
            store.remove_layer(p.name)
        elif p.kind == "cache":
            store.remove_cache(p.name)
        elif p.kind == "index":
            done.append(f"moved {p.name} to {store.set_aside_images()} ({p.why})")
            continue
        done.append(f"removed {p}")
    return done
