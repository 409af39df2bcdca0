"""Reporters of the command line: the plain text rbuild has always shown, JSON lines, quiet, and (in
cli/tty.py, imported only when chosen) the live terminal view.

`--progress=plain` (the default) writes step lines, cache hits and notices to stderr, relays RUN output
to it directly and draws blob transfers live on a terminal; `--progress=quiet` (`-q`) shows only
warnings and the output of a RUN that failed; `--progress=json` writes one JSON object per event to
stderr; `--progress=tty` draws the live view (cli/tty.py); `--progress=auto` (the default) is tty when
stderr is a terminal, plain otherwise. stdout stays for the image id either way.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
import threading
import time
from typing import TextIO

from rootless.events import (
    BuildDone,
    CacheHit,
    Event,
    Notice,
    Output,
    Reporter,
    StepDone,
    StepStarted,
    Transfer,
    Warn,
)

PROGRESS_MODES = ("auto", "tty", "plain", "json", "quiet")

_VERBS = {"pull": "Copying", "push": "Pushing"}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    raise AssertionError("unreachable")


class PlainReporter:
    """Human-readable lines on a text stream (stderr); `quiet` keeps only warnings and failed RUN output.

    Stages built at once (`--jobs`, the step events say `parallel`): every line of a stage is prefixed with
    `[N/M]` as its step lines are, RUN output line by line, so interleaved lines stay attributed; stages
    built one by one show what rbuild has always shown.
    """

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = not quiet and self.stream.isatty()  # blob transfers are drawn only on a terminal
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[str, int, int, str]] = {}  # digest -> (verb, done, total, state)
        self._drawn = 0
        self._stages = 0  # stages of the build (from its step lines)
        self._tagged = False  # stages run at once: their lines carry the stage
        self._open: int | None = None  # the stage whose RUN output line is unfinished on the stream (tagged)
        self._mid_line = False  # RUN output passed through here ended without a newline

    @property
    def output_fd(self) -> int | None:
        return self.stream.fileno()

    def emit(self, event: Event) -> None:
        with self._lock:
            try:
                self._show(event)
            except (OSError, ValueError):  # the terminal went away: the build goes on
                pass

    def _show(self, event: Event) -> None:
        stage = getattr(event, "stage", None)
        if isinstance(event, StepStarted):
            self._stages, self._tagged = event.stages, event.parallel
        if isinstance(event, Output):
            self.stream.flush()
            if self._tagged and stage is not None:
                self._tagged_output(stage, event.data)
            else:
                self._end_open_line()
                self.stream.buffer.write(event.data)
                self._mid_line = not event.data.endswith(b"\n") if event.data else self._mid_line
            self.stream.buffer.flush()
            return
        if isinstance(event, Transfer):
            if self.live:
                self._draw(event)
            return
        line = self._line(event)
        if line is not None:
            if self._tagged and stage is not None and not isinstance(event, StepStarted):
                line = f"{self._tag(stage)}{line}"
            self._rows.clear()  # transfers drawn so far stay above this line
            self._drawn = 0
            self.stream.flush()
            self._end_open_line()
            self.stream.write(line + "\n")
            self.stream.flush()

    def _tag(self, stage: int) -> str:
        return f"[{stage}/{self._stages}] "

    def _end_open_line(self) -> None:
        """End a RUN's unfinished output line before anything else is written (it is continued, tagged)."""
        if self._open is not None or self._mid_line:
            self.stream.buffer.write(b"\n")
            self.stream.buffer.flush()
            self._open = None
            self._mid_line = False

    def _tagged_output(self, stage: int, data: bytes) -> None:
        """RUN output of one of the stages running at once, each line after its stage's tag."""
        if self._open != stage:
            self._end_open_line()
        tag = self._tag(stage).encode()
        out = bytearray()
        for piece in data.splitlines(keepends=True):
            if self._open != stage:
                out += tag
            out += piece
            self._open = None if piece.endswith((b"\n", b"\r")) else stage
        self.stream.buffer.write(bytes(out))

    def _line(self, event: Event) -> str | None:
        if isinstance(event, Warn):
            return event.text
        if self.quiet:
            return None
        if isinstance(event, StepStarted):
            prefix = f"[{event.stage}/{event.stages}] " if event.stages > 1 else ""
            return f"{prefix}STEP {event.index}/{event.steps}: {event.text}"
        if isinstance(event, CacheHit):
            where = " from the registry cache" if event.source == "registry" else ""
            return f"--> Using cache {event.key[:12]}{where}"
        if isinstance(event, StepDone):
            return None if event.cached else f"--> {event.key[:12]}"
        if isinstance(event, Notice):
            return event.text
        if isinstance(event, BuildDone):
            return f"--> built in {event.seconds:.2f}s"
        return None

    def _draw(self, event: Transfer) -> None:
        """Redraw the block of transfer lines in place (the cursor sits below it)."""
        self._rows[event.digest] = (_VERBS.get(event.action, event.action), event.done, event.total, event.state)
        lines = []
        for digest, (verb, done, total, state) in self._rows.items():
            amount = state or f"{_size(done)} / {_size(total)}"
            lines.append(f"{verb} blob {digest[:19]} {amount}")
        out = ("\x1b[A" * self._drawn) + "".join(f"\r\x1b[K{line}\n" for line in lines)
        self._drawn = len(lines)
        self.stream.write(out)
        self.stream.flush()


_TYPES = {
    StepStarted: "step",
    CacheHit: "cache-hit",
    Output: "output",
    Transfer: "transfer",
    Warn: "warning",
    Notice: "notice",
    StepDone: "step-done",
    BuildDone: "build-done",
}


class JsonReporter:
    """One JSON object a line per event, on a text stream (stderr): {"type": ..., "time": ..., fields}.

    RUN output comes as "output" events whose "data" is base64 (it is bytes, not always text).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    @property
    def output_fd(self) -> int | None:
        return None

    def emit(self, event: Event) -> None:
        doc: dict[str, object] = {"type": _TYPES[type(event)], "time": round(time.time(), 6)}
        doc.update(dataclasses.asdict(event))
        if isinstance(event, Output):
            doc["data"] = base64.b64encode(event.data).decode()
        line = json.dumps(doc, sort_keys=True) + "\n"
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):  # the reader went away: the build goes on
                pass


def reporter(mode: str, stream: TextIO | None = None) -> Reporter:
    """The reporter for a --progress mode; `auto` is the live view on a terminal (not a dumb one)."""
    if mode == "json":
        return JsonReporter(stream)
    if mode == "auto":
        shown = stream or sys.stderr
        mode = "tty" if shown.isatty() and os.environ.get("TERM", "dumb") != "dumb" else "plain"
    if mode == "tty":
        from rootless.cli.tty import TtyReporter

        return TtyReporter(stream)
    return PlainReporter(stream, quiet=mode == "quiet")
