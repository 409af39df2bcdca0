"""The step cache: what a build step produced, found again by the step's key.

The executor talks only to the StepCache protocol: the store's local cache, or that backed by the
`--cache-from` registry caches (build/regcache.py). A key (`state.key_of`) covers everything a step's
result depends on (its parent's key, the expanded instruction, the args and environment it sees, its
sources' content), never mtimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rootless.build.regcache import CacheSpec, RegistryCache
    from rootless.build.state import ImageConfig
    from rootless.events import Reporter
    from rootless.layer.ownership import Ownership
    from rootless.store.store import Store

CACHE_VERSION = "rbuild-cache-1"


@dataclass
class StepResult:
    """A step's outcome: the image config after it, its layers (diff ids, bottom first), whether CMD was set
    (None: not recorded, in entries older stores wrote), and where it was found ("local", "registry")."""

    config: ImageConfig
    layers: list[str]
    cmd_set: bool | None
    source: str = "local"


class StepCache(Protocol):
    def lookup(self, key: str) -> StepResult | None:
        """The result stored under key, if it is there and usable (its layers present)."""
        ...

    def store(self, key: str, result: StepResult) -> None:
        """Keep result under key."""
        ...


class LocalStepCache:
    """The step cache in the local store's cache/ directory (one JSON file a key)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # layers found in the store during this build (which holds it: no GC removes them meanwhile), so
        # that each step's lookup checks only its own new layers, not its whole stack again
        self._present: set[str] = set()

    def lookup(self, key: str) -> StepResult | None:
        hit = self._store.cache_get(key, self._present)
        if hit is None:
            return None
        return StepResult(hit["config"], hit["layers"], hit.get("cmd_set"))

    def store(self, key: str, result: StepResult) -> None:
        self._store.cache_put(key, {"config": result.config, "layers": result.layers, "cmd_set": result.cmd_set})


class RegistryStepCache:
    """A local cache backed by `--cache-from` registry caches: a local miss asks them (read at the first
    miss, so a fully cached build never does); a remote hit's layers are unpacked into the store and the
    entry kept locally. Results are stored locally only (`--cache-to` pushes after the build)."""

    def __init__(
        self,
        local: StepCache,
        store: Store,
        ownership: Ownership,
        registry_options: Any,
        specs: list[CacheSpec],
        reporter: Reporter,
    ) -> None:
        self._local = local
        self._args = (store, ownership, registry_options, reporter)
        self._specs = specs
        self._remote: RegistryCache | None = None

    def lookup(self, key: str) -> StepResult | None:
        hit = self._local.lookup(key)
        if hit is not None:
            return hit
        if self._remote is None:
            from rootless.build.regcache import RegistryCache

            self._remote = RegistryCache(*self._args)
            self._remote.load(self._specs)
        found = self._remote.get(key)
        if found is None:
            return None
        return StepResult(found["config"], found["layers"], found["cmd_set"], "registry")

    def store(self, key: str, result: StepResult) -> None:
        self._local.store(key, result)
