"""OCI and Docker v2s2 image documents: configs, manifests, media types and the conversions between them."""

from __future__ import annotations

import json
from typing import Any

from rootless.oci.platform import host_platform

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = DOCKER_LAYER + ".gzip"
OCI_FOREIGN = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
# OCI layer type <-> docker layer type; zstd has no docker spelling.
TO_DOCKER = {OCI_LAYER: DOCKER_LAYER, OCI_LAYER_GZIP: DOCKER_LAYER_GZIP, OCI_FOREIGN + "+gzip": DOCKER_FOREIGN}
TO_OCI = {v: k for k, v in TO_DOCKER.items()}
LAYER_TYPES = frozenset(
    {OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_FOREIGN, OCI_FOREIGN + "+gzip", OCI_FOREIGN + "+zstd", *TO_OCI}
)
RBUILD_CACHE_CONFIG = "application/vnd.rbuild.cache.config.v1+json"  # the config of rbuild's registry cache
REF_NAME = "org.opencontainers.image.ref.name"


def canonical(doc: dict[str, Any]) -> bytes:
    """The exact bytes we store and hash: compact, key-sorted JSON (stable across runs)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def new_config(created: str) -> dict[str, Any]:
    return {
        "created": created,
        "architecture": host_platform().architecture,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    }


def layer_media_type(fmt: str, compression: str) -> str:
    """Media type for a layer blob compressed with `compression` ("gzip", "zstd" or "none")."""
    if fmt == "docker":
        return {"gzip": DOCKER_LAYER_GZIP, "none": DOCKER_LAYER}[compression]
    return {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER}[compression]


def compression_of(media_type: str) -> str:
    if media_type.endswith("gzip"):
        return "gzip"
    if media_type.endswith("zstd"):
        return "zstd"
    return "none"


def manifest(
    fmt: str,
    config_digest: str,
    config_size: int,
    layers: list[dict[str, Any]],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if fmt == "docker" else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if fmt == "docker" else OCI_CONFIG,
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers,
    }
    if annotations and fmt != "docker":
        doc["annotations"] = annotations
    return doc


def inspect_doc(
    image_id: str, names: list[str], config: dict[str, Any], manifest_digest: str, size: int, repo_digests: list[str]
) -> dict[str, Any]:
    """docker inspect's shape for an image."""
    return {
        "Id": image_id,
        "Digest": manifest_digest,
        "RepoTags": names,
        "RepoDigests": repo_digests,
        "Created": config.get("created", ""),
        "Author": config.get("author", ""),
        "Architecture": config.get("architecture", ""),
        "Os": config.get("os", ""),
        "Variant": config.get("variant", ""),
        "Config": config.get("config", {}),
        "RootFS": {"Type": "layers", "Layers": config.get("rootfs", {}).get("diff_ids", [])},
        "History": config.get("history", []),
        "Size": size,
    }
