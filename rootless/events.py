"""Build events and the Reporter that receives them: nothing below the command line prints.

The builder, the registry client and the environment code describe what happens as typed events; the
command line chooses how they are shown (plain text, JSON lines, nothing). A reporter may be called from
worker threads (parallel blob transfers, stages built at once), so reporters serialise their own output;
an event of a stage says which (`stage`, StepStarted's number), so a reporter can attribute interleaved lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepStarted:
    """An instruction begins: stage `stage` of `stages` (build order, from 1), step `index` of `steps`."""

    stage: int
    stages: int
    index: int
    steps: int
    text: str
    file: str
    line: int
    parallel: bool = False  # stages of this build run at once (--jobs): lines of stages may interleave


@dataclass(frozen=True)
class CacheHit:
    """The step's result came from the step cache under `key`: the store's own ("local") or a
    `--cache-from` registry cache ("registry")."""

    key: str
    source: str = "local"
    stage: int | None = None  # the stage it belongs to (StepStarted's number), None: the build's own


@dataclass(frozen=True)
class Output:
    """A chunk of a RUN's stdout and stderr (merged), as it arrives; only when it is not relayed to a terminal."""

    data: bytes
    stage: int | None = None  # the stage it belongs to (StepStarted's number), None: the build's own


@dataclass(frozen=True)
class Transfer:
    """Progress of one blob: `action` is "pull" or "push"; `state` is set once it is settled ("done", ...)."""

    action: str
    digest: str
    done: int
    total: int
    state: str = ""


@dataclass(frozen=True)
class Warn:
    """Something the user should fix, the build goes on (unused build args, Containerfile style)."""

    text: str
    stage: int | None = None  # the stage it belongs to (StepStarted's number), None: the build's own


@dataclass(frozen=True)
class Notice:
    """An informational line: a pulled base image, an ONBUILD trigger, a tag, a degraded environment."""

    text: str
    stage: int | None = None  # the stage it belongs to (StepStarted's number), None: the build's own


@dataclass(frozen=True)
class StepDone:
    """A step finished: its cache key, the layer it made (None: none), how long it took, whether it was cached."""

    key: str
    layer: str | None
    seconds: float
    cached: bool
    stage: int | None = None  # the stage it belongs to (StepStarted's number), None: the build's own


@dataclass(frozen=True)
class BuildDone:
    """The image is committed."""

    image_id: str
    seconds: float


Event = StepStarted | CacheHit | Output | Transfer | Warn | Notice | StepDone | BuildDone


class Reporter(Protocol):
    """Receives the events of a build, a pull or a push."""

    @property
    def output_fd(self) -> int | None:
        """A descriptor a RUN's output may be relayed to directly (a terminal, stderr), or None: Output events."""
        ...

    def emit(self, event: Event) -> None:
        """Show or record one event; must not raise for ordinary output trouble."""
        ...


class NullReporter:
    """Drops every event (library use, tests, `-q` internals)."""

    @property
    def output_fd(self) -> int | None:
        return None

    def emit(self, event: Event) -> None:
        pass
