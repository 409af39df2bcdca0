"""One handler per instruction type: the step loop (`executor`) asks it three things and nothing else.

`describe` is the history's `created_by` (BuildKit's wording, also part of the cache key),
`cache_extra` what the key needs beyond the expanded instruction (COPY's source content, RUN's bind
sources), `apply` carries the instruction out on a new state and says whether it made a layer.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Generic, TypeVar

from rootless.build.state import StageState
from rootless.frontend.instructions import Command

if TYPE_CHECKING:
    from rootless.build.executor import Executor

C = TypeVar("C", bound=Command)


class Step(abc.ABC, Generic[C]):
    def __init__(self, ex: Executor) -> None:
        self.ex = ex

    def describe(self, cmd: C) -> str:
        return cmd.node.original.strip()

    def cache_extra(self, state: StageState, cmd: C) -> object:
        return None

    @abc.abstractmethod
    def apply(self, state: StageState, cmd: C) -> bool:
        """Carry `cmd` out on `state` (a fresh copy the step owns); True when it made a layer."""
