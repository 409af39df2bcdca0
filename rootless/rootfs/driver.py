"""The root filesystem driver seam: how a step gets a tree over its parent's layers, and its layer back.

One driver is chosen per build (by the strategy, `rootless.env.strategy`); the build asks it for
- `view(lowers, target)`: a read-only tree of a layer list (COPY --from, RUN --mount=from=...);
- `writable(lowers, workdir, target)`: a writable tree (at `target` for a driver that mounts, elsewhere
  for one that does not: callers use the path it gives). When the context closes,
  `WritableRoot.diff()` is the step's layer directory in the store's on-disk layer format
  (`rootless.layer.format`): for kernel overlay the upper dir itself (no copy), for a copy root the
  result of comparing the tree with its parent.
Lower dirs are given top first, as overlay's `lowerdir`. A new driver (FUSE, copy) is a subclass of
`RootfsDriver` plus a line in the strategy's table: the build loop does not change.
"""

from __future__ import annotations

import abc
import contextlib
from typing import ClassVar

from rootless.layer.format import FORMAT, LayerFormat


class WritableRoot(abc.ABC):
    """A step's writable tree. `touched`: existing directories in which the sandbox made (and removed)
    mount points; a driver whose diff would otherwise report them as changed drops them when unchanged.
    `upper`: where the step's own entries are, with the inodes its layer will have (overlay: the upper
    dir; a copy root: the tree itself) -- the single-uid supervisor records symlink owners there."""

    def __init__(self, path: str, upper: str | None = None) -> None:
        self.path = path
        self.upper = upper if upper is not None else path
        self.touched: list[str] = []

    @abc.abstractmethod
    def diff(self) -> str:
        """The step's layer directory (call after the writable context closed); it may be renamed into
        the store, and is empty when the step changed nothing."""


class RootfsDriver(abc.ABC):
    """Assembles trees from unpacked layer directories."""

    name: ClassVar[str]
    keeps_trees: ClassVar[bool] = False  # wants a directory for the whole build (`session`)
    formats: ClassVar[tuple[str, ...]] = (FORMAT.name,)  # the layer formats it builds on (kernel overlay's)
    layer_format: LayerFormat = FORMAT  # the store's, set by the strategy: the format its diffs are written in

    def session(self, home: str) -> contextlib.AbstractContextManager[None]:
        """The build's lifetime; `home`: a private directory on the store's filesystem, held (and removed)
        by the caller, where a driver with `keeps_trees` keeps trees from one step to the next."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def view(self, lowers: list[str], target: str) -> contextlib.AbstractContextManager[str]:
        """A read-only tree of `lowers`, removed on exit: its path (`target`, an existing empty directory,
        or another that holds the same tree)."""

    @abc.abstractmethod
    def writable(self, lowers: list[str], workdir: str, target: str) -> contextlib.AbstractContextManager[WritableRoot]:
        """A writable tree over `lowers` at `WritableRoot.path`: the existing empty directory `target` for a
        driver that mounts, else a directory of its own; `workdir` is an existing private directory on the
        store's filesystem for the driver's own files (the layer dir among them). `diff()` is called before
        the driver is asked for another tree."""
