"""What the build loop carries from step to step: options, the stage's state, the image config's shape.

A stage's state is its image config, its layer list (diff_ids, bottom first) and the cache key that
produced them; each step makes a new state, so a cache hit is just a stored state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from rootless.build.regcache import CacheSpec


class ContainerConfig(TypedDict, total=False):
    """The `config` object of an OCI image config (the keys a Containerfile sets)."""

    User: str
    ExposedPorts: dict[str, dict[str, object]]
    Env: list[str]
    Entrypoint: list[str]
    Cmd: list[str]
    Volumes: dict[str, dict[str, object]]
    WorkingDir: str
    Labels: dict[str, str]
    StopSignal: str
    Shell: list[str]
    Healthcheck: dict[str, object]
    OnBuild: list[str]
    ArgsEscaped: bool


class ImageConfig(TypedDict, total=False):
    """An OCI image config as the build edits it (other keys a base image has are kept as they are)."""

    created: str
    author: str
    architecture: str
    os: str
    variant: str
    config: ContainerConfig
    rootfs: dict[str, Any]
    history: list[dict[str, Any]]


@dataclass
class BuildOptions:
    tags: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False
    fmt: str = "oci"
    quiet: bool = False
    timestamp: int | None = None
    source_date_epoch: int | None = None
    rewrite_timestamp: bool = True
    pull: str = "missing"
    registry_options: Any = None
    containerfile: str | None = None
    secrets: dict[str, bytes] = field(default_factory=dict)  # id -> value (RUN --mount=type=secret)
    debug: bool = False  # --log-level debug: show each RUN's sandbox operations
    cache_from: list[CacheSpec] = field(default_factory=list)  # registry caches to read steps from
    ssh: dict[str, str] = field(default_factory=dict)  # --ssh: id -> an ssh-agent socket (RUN --mount=type=ssh)
    network: str = "host"  # --network: what RUN --network=default means ("host" or "none")
    cache_to: list[CacheSpec] = field(default_factory=list)  # registry caches to write the build's steps to
    jobs: int = 0  # --jobs: stages built at once (independent ones); 0: one per CPU the build may use


@dataclass
class StageState:
    """Where a stage is: its image config, its layers and the cache key that produced them."""

    config: ImageConfig
    layers: list[str]
    key: str
    args: dict[str, str] = field(default_factory=dict)
    cmd_set: bool = False
    # (diff_id, descriptor) of the base image's layers, bottom first, from the manifest of the name FROM
    # used: the built image records (and pushes) these blobs for them, not whichever a store holds
    base_blobs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def key_of(*parts: object) -> str:
    """A cache key: the hash of its parts' canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def env_dict(config: ImageConfig) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in config.get("config", {}).get("Env") or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def set_env(config: ImageConfig, key: str, value: str) -> None:
    env = list(config["config"].get("Env") or [])
    for i, item in enumerate(env):
        if item.partition("=")[0] == key:
            env[i] = f"{key}={value}"
            break
    else:
        env.append(f"{key}={value}")
    config["config"]["Env"] = env
