"""A fully cached build answered without entering the user namespace (issue 15).

When every step of a build is in the store's step cache, the build only reads the store (image records,
configs, cache entries, the context's file digests) and writes files the namespace's root would write as
the same host user (the image's config and manifest blobs, `images.json`, the file digest cache). The
command line tries this first: the step loop runs here with a cache that answers only hits and a FROM
that takes only the local store, its events held back. The first miss (a step to run, a base image to
pull, anything that fails) drops everything this attempt did and the build runs in the namespace as
always, so the outcome, the image id and the events are the same either way; only their timing differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rootless.build.cache import LocalStepCache, StepResult
from rootless.build.executor import Executor
from rootless.build.planner import Plan
from rootless.build.state import BuildOptions, StageState
from rootless.env.strategy import Strategy
from rootless.events import BuildDone, Event, Reporter
from rootless.frontend.containerfile import Node
from rootless.store.store import ImageRecord, Store


class Miss(Exception):
    """The build needs more than the cache: it runs in the namespace instead."""


class _HitsOnly:
    """The store's step cache, where a miss ends the attempt."""

    def __init__(self, store: Store) -> None:
        self.local = LocalStepCache(store)

    def lookup(self, key: str) -> StepResult | None:
        hit = self.local.lookup(key)
        if hit is None:
            raise Miss(key)
        return hit

    def store(self, key: str, result: StepResult) -> None:
        raise Miss(key)


class _Held:
    """Events kept until the build is known to be answered here (then replayed, in order)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    @property
    def output_fd(self) -> int | None:
        return None

    def emit(self, event: Event) -> None:
        self.events.append(event)


class _CachedExecutor(Executor):
    """The step loop, minus everything that writes layers or reaches a registry."""

    def resolve_image(self, name: str, node: Node, platform: str | None = None) -> ImageRecord:
        """An image of the local store under that name, with all its layers (as the namespace's build
        takes it under --pull=missing or never); anything else is for the build in the namespace."""
        from rootless.oci import names, transports

        if transports.parse_transport(name).local:  # oci:, oci-archive:, docker-archive: import each build
            raise Miss(name)
        rec = self.store.find(names.candidates(name))
        if rec is None or not transports.complete(self.store, rec):
            raise Miss(name)
        return rec

    def with_rootfs(self, state: StageState, action: Callable[[str, str], None], untrusted: bool = False) -> bool:
        raise Miss("a step needs a tree")


def build(plan: Plan, store: Store, opts: BuildOptions, strategy: Strategy, reporter: Reporter) -> str | None:
    """The image id when every step of `plan` is cached (its events then go to reporter, as
    `executor.build` sends them), else None and nothing was said. The caller holds the store
    (`Store.in_use`) and has checked what the namespace's build would check first: the store's format,
    mapping and recorded strategy."""
    if opts.no_cache or opts.cache_from or opts.cache_to or opts.pull not in ("missing", "never"):
        return None
    start = time.monotonic()
    held = _Held()
    try:
        image_id = _CachedExecutor(plan, store, opts, strategy, held, _HitsOnly(store)).run()
    except Exception:  # a miss, or whatever stops it here, the build in the namespace meets it (and says it)
        return None
    for event in held.events:
        reporter.emit(event)
    reporter.emit(BuildDone(image_id, time.monotonic() - start))
    return image_id
