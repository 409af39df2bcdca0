"""The step cache in a registry (`--cache-from`, `--cache-to`): a fresh store reuses steps built elsewhere.

A cache is one OCI manifest (docs/cache-format.md). Its config blob, of media type `CONFIG_TYPE`, is the
index: `{"rbuild-cache": 1, "entries": {KEY: {"config", "layers", "cmd_set"}}, "layers": {DIFF_ID:
DESCRIPTOR}}`; its layers are the gzip blobs of every layer an entry names. KEY is the step key the build
computes from the instruction, its sources' content, the build args it sees and its parent's key down to
the base image's config digest -- nothing of the machine, user, store path or rung -- so a cache made by
one user on overlay serves another on the copy rung, and gives the same image. Entries hold what the
local step cache holds: image configs (never a secret: secrets reach only a RUN's tmpfs) and layers
(never a cache mount's content).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rootless.blob.digest import check_digest, hex_of, is_sha256_hex, sha256_of
from rootless.errors import RbuildError
from rootless.events import Reporter, Warn
from rootless.layer.ownership import Ownership
from rootless.oci import image as img
from rootless.store.store import Store, chain_ids

if TYPE_CHECKING:
    from rootless.build.cache import StepCache
    from rootless.oci.transports import RegistryTransport

CONFIG_TYPE = img.RBUILD_CACHE_CONFIG
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CacheSpec:
    ref: str
    mode: str = "max"  # max: every step of the build; min: the steps of the final stage


def parse_spec(text: str, flag: str) -> CacheSpec:
    """`[docker://]REF`, or BuildKit's `type=registry,ref=REF[,mode=min|max]`."""
    if "=" not in text.split(",", 1)[0]:
        _registry(text, flag)
        return CacheSpec(text)
    fields: dict[str, str] = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            raise RbuildError(f"{flag} {text}: expected key=value, got {part!r}")
        fields[k.strip()] = v.strip()
    kind = fields.pop("type", "registry")
    if kind != "registry":
        raise RbuildError(f"{flag} {text}: only type=registry is supported")
    ref = fields.pop("ref", "")
    if not ref:
        raise RbuildError(f"{flag} {text}: ref= is missing")
    mode = fields.pop("mode", "max")
    if mode not in ("min", "max"):
        raise RbuildError(f"{flag} {text}: mode must be min or max")
    fields.pop("ignore-error", None)
    if fields:
        raise RbuildError(f"{flag} {text}: unknown option {sorted(fields)[0]!r}")
    _registry(ref, flag)
    return CacheSpec(ref, mode)


def _registry(ref: str, flag: str) -> RegistryTransport:
    """The registry transport `ref` names; a cache in a layout or an archive is refused."""
    from rootless.oci import transports

    where = transports.parse_transport(ref)
    if not isinstance(where, transports.RegistryTransport):
        raise RbuildError(f"{flag} {ref}: a cache is kept in a registry ([docker://]REF), not in {where.prefix}")
    return where


def _check_index(data: Any, what: str) -> dict[str, Any]:
    """The index's shape, checked before anything in it is trusted (keys and digests are validated)."""
    if not isinstance(data, dict) or data.get("rbuild-cache") != FORMAT_VERSION:
        raise RbuildError(f"{what}: not an rbuild cache of format {FORMAT_VERSION}")
    entries, layers = data.get("entries"), data.get("layers")
    if not isinstance(entries, dict) or not isinstance(layers, dict):
        raise RbuildError(f"{what}: entries and layers must be objects")
    for key, e in entries.items():
        if not is_sha256_hex(key):
            raise RbuildError(f"{what}: bad entry key {key[:80]!r}")
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("config"), dict)
            or not isinstance(e.get("layers"), list)
            or not all(isinstance(d, str) and d in layers for d in e["layers"])
        ):
            raise RbuildError(f"{what}: entry {key[:12]} is malformed or names a layer the cache lacks")
    for diff_id, desc in layers.items():
        try:
            hex_of(diff_id)
        except RbuildError:
            raise RbuildError(f"{what}: bad diff_id {str(diff_id)[:80]!r}") from None
        digest = desc.get("digest") if isinstance(desc, dict) else None
        try:
            if not isinstance(digest, str) or not isinstance(desc.get("size"), int):
                raise RbuildError("not a descriptor")
            check_digest(digest)
        except RbuildError:
            raise RbuildError(f"{what}: bad descriptor for {diff_id}") from None
    return data


class RegistryCache:
    """The entries of every `--cache-from` cache, read once; steps are materialised on demand."""

    def __init__(self, store: Store, ownership: Ownership, registry_options: Any, reporter: Reporter) -> None:
        from rootless.registry import api as registry

        self.store = store
        self.ownership = ownership
        self.options = registry_options or registry.RegistryOptions()
        self.client = registry.Registry(self.options)
        self.reporter = reporter
        self.entries: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {}  # key -> (ref, entry, layers)

    def load(self, specs: list[CacheSpec]) -> None:
        from rootless.oci.reference import parse_reference

        for spec in specs:
            what = f"--cache-from {spec.ref}"
            ref = parse_reference(_registry(spec.ref, "--cache-from").rest)
            try:
                config = self.client.client.resolve_artifact(ref, CONFIG_TYPE)
            except RbuildError as e:
                self.reporter.emit(Warn(f"{what}: not used: {e}"))  # a missing cache is not an error (BuildKit: same)
                continue
            try:
                data = _check_index(json.loads(config), what)
            except ValueError as e:
                raise RbuildError(f"{what}: index is not JSON: {e}") from None
            for key, entry in data["entries"].items():
                self.entries.setdefault(key, (ref, entry, data["layers"]))

    def get(self, key: str) -> dict[str, Any] | None:
        """The step's state from a remote cache, its layers unpacked into the store, or None."""
        found = self.entries.get(key)
        if found is None:
            return None
        from rootless.oci.transports import unpack_blob
        from rootless.registry.api import Descriptor

        ref, entry, descs = found
        diff_ids: list[str] = list(entry["layers"])
        chains = chain_ids(diff_ids)
        missing = [
            Descriptor.from_json(descs[d], f"cache layer {d}")
            for d, c in zip(diff_ids, chains, strict=True)
            if not self.store.has_layer(c) and not self.store.has_blob(descs[d]["digest"])
        ]
        self.client.fetch_blobs(ref, missing, os.path.join(self.store.root, "blobs"), self.reporter)
        for i, (diff_id, chain) in enumerate(zip(diff_ids, chains, strict=True)):
            if self.store.has_layer(chain):
                continue
            digest = descs[diff_id]["digest"]
            with self.store.staging("unpack-") as tmp:
                target = os.path.join(tmp, "diff")
                os.mkdir(target, 0o755)
                size = unpack_blob(
                    self.store.blob_path(digest),
                    digest,
                    target,
                    diff_id,
                    self.store.layer_dirs(diff_ids[:i]),
                    self.ownership,
                    f"cache {ref}: ",
                )
                meta = {"diff_id": diff_id, "parent": chains[i - 1] if i else "", "size": size}
                meta.update({"origin": "blob", "sources": [digest], "blobs": []})
                self.store.add_layer(target, chain, meta)
        state = {"config": entry["config"], "layers": diff_ids, "cmd_set": bool(entry.get("cmd_set"))}
        self.store.cache_put(key, state)
        return state


def export(store: Store, cache: StepCache, spec: CacheSpec, keys: list[str], registry_options: Any) -> str:
    """Push the entries of `cache` under `keys` (in build order) with their layers' gzip blobs (from the
    store); the manifest digest."""
    from rootless.oci.transports import Blob, layer_blob

    entries: dict[str, Any] = {}
    layers: dict[str, dict[str, Any]] = {}
    blobs: list[Blob] = []
    for key in keys:
        found = None if key in entries else cache.lookup(key)
        if found is None:
            continue
        entries[key] = {"config": found.config, "layers": found.layers, "cmd_set": bool(found.cmd_set)}
        for diff_id, chain in zip(found.layers, chain_ids(found.layers), strict=True):
            if diff_id in layers:
                continue
            blob = layer_blob(store, diff_id, chain, None, "oci", "gzip", None)
            layers[diff_id] = blob.descriptor
            blobs.append(blob)
    index = img.canonical({"rbuild-cache": FORMAT_VERSION, "entries": entries, "layers": layers})
    manifest = img.canonical(
        {
            "schemaVersion": 2,
            "mediaType": img.OCI_MANIFEST,
            "artifactType": CONFIG_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": sha256_of(index), "size": len(index)},
            "layers": [b.descriptor for b in blobs],
        }
    )
    target = _registry(spec.ref, "--cache-to")
    return target.push(manifest, img.OCI_MANIFEST, CONFIG_TYPE, index, blobs, registry_options)
