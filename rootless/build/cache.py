"""The step cache: what a build step produced, found again by the step's key.

The executor talks only to the StepCache protocol, so a cache kept elsewhere (a registry, issue 14) can
stand in for the store's local one. A key covers everything a step's result depends on (its parent's key,
the expanded instruction, the args and environment it sees, its sources' content), never mtimes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rootless.store.store import Store

CACHE_VERSION = "rbuild-cache-1"


def step_key(*parts: object) -> str:
    """The key of a step (or a stage base) made of these parts: a sha256 of their canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StepResult:
    """A step's outcome: the image config after it, its layers (diff ids, bottom first), whether CMD was set
    (None: not recorded, in entries older stores wrote)."""

    config: dict[str, Any]
    layers: list[str]
    cmd_set: bool | None


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

    def lookup(self, key: str) -> StepResult | None:
        hit = self._store.cache_get(key)
        if hit is None:
            return None
        return StepResult(hit["config"], hit["layers"], hit.get("cmd_set"))

    def store(self, key: str, result: StepResult) -> None:
        self._store.cache_put(key, {"config": result.config, "layers": result.layers, "cmd_set": result.cmd_set})
