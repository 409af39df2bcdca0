"""The live terminal view of a build (`--progress=tty`, and `auto` on a terminal), drawn with plain ANSI.

Finished lines scroll up as ordinary terminal output (a step with its time or CACHED, a pulled or pushed
blob with its size and rate, warnings, notices); below them a live block is redrawn in place: the running
step with its elapsed time, the last lines of its RUN output, and the blobs in flight with bytes and rate.
A summary ends the build. Plain escape sequences (cursor up, erase line) are all it needs, so the view
costs no import beyond the standard library, and nothing at all unless it is chosen.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from rootless.events import BuildDone, CacheHit, Event, Notice, Output, StepDone, StepStarted, Transfer, Warn

PANE_LINES = 6  # lines of a running step's output kept in view
KEEP_LINES = 200  # lines of a running step's output kept to show in full when the build fails
TICK = 0.1  # seconds between redraws of the live block while a step runs

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|[\x00-\x08\x0b-\x1f\x7f]")
_BOLD, _DIM, _GREEN, _YELLOW, _BLUE, _RED, _RESET = (
    "\x1b[1m",
    "\x1b[2m",
    "\x1b[32m",
    "\x1b[33m",
    "\x1b[34m",
    "\x1b[31m",
    "\x1b[0m",
)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    raise AssertionError("unreachable")


def _secs(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


@dataclass
class _Blob:
    action: str
    done: int
    total: int
    started: float

    def line(self, digest: str, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-3)
        verb = "pulling" if self.action == "pull" else "pushing"
        return f"  {verb} {digest[:19]} {_size(self.done)} / {_size(self.total)}  {_size(rate)}/s"


@dataclass
class _Step:
    event: StepStarted
    started: float
    cached: bool = False
    lines: list[str] = field(default_factory=list)
    partial: bytes = b""

    def add(self, data: bytes) -> None:
        """Split RUN output into display lines (a carriage return restarts its line, escapes are dropped)."""
        data = self.partial + data
        *whole, self.partial = data.split(b"\n")
        for raw in whole:
            self.lines.append(_clean(raw))
        del self.lines[:-KEEP_LINES]

    def tail(self) -> list[str]:
        shown = self.lines + ([_clean(self.partial)] if self.partial else [])
        return shown[-PANE_LINES:]


def _clean(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").rsplit("\r", 1)[-1]
    return _ESCAPES.sub("", text).expandtabs(4)


class TtyReporter:
    """Draws a build on a terminal; called from worker threads too (parallel blob transfers), so it locks."""

    def __init__(self, stream: TextIO | None = None, color: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.color = color if color is not None else not os.environ.get("NO_COLOR")
        self._lock = threading.Lock()
        self._drawn = 0  # lines of the live block on screen, the cursor below them
        self._steps: dict[int, _Step] = {}  # the running step of each stage (stages may run at once)
        self._stage = 0
        self._blobs: dict[str, _Blob] = {}
        self._counts = {"run": 0, "cached": 0}
        self._slowest: tuple[float, str] = (0.0, "")
        self._moved = 0  # bytes pulled and pushed
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def output_fd(self) -> int | None:
        return None  # RUN output comes as Output events, into the pane

    def emit(self, event: Event) -> None:
        with self._lock:
            try:
                self._show(event)
            except (OSError, ValueError):  # the terminal went away: the build goes on
                pass

    def failed(self) -> None:
        """The build failed: the live block gives way to the failing step's whole output (as kept)."""
        self._stop.set()
        with self._lock:
            lines: list[str] = []
            word = "FAILED" if len(self._steps) == 1 else "FAILED or stopped:"  # the Error line says which
            for step in self._steps.values():
                e = step.event
                lines.append(self._paint(_RED, f"{word} {self._where(e)}{e.text}"))
                lines += [f"  {line}" for line in step.lines + ([_clean(step.partial)] if step.partial else [])]
            self._steps.clear()
            self._blobs.clear()
            try:
                self._redraw(lines)
            except (OSError, ValueError):
                pass

    # -- events

    def _show(self, event: Event) -> None:
        now = time.monotonic()
        done: list[str] = []
        stage = getattr(event, "stage", None) or self._stage
        if isinstance(event, StepStarted):
            # FROM and other steps that make no StepDone end with the next step of their stage; stages one
            # by one: with the next step at all (a stage of FROM alone, too)
            ended = [
                n for n, st in self._steps.items() if n == event.stage or not event.parallel or st.event.steps == 1
            ]
            for n in ended:
                old = self._steps.pop(n)
                done.append(self._step_line(old, now - old.started))
            if event.stage != self._stage and event.stages > 1 and not event.parallel:
                done.append(self._paint(_BOLD, f"stage {event.stage}/{event.stages}"))
            self._stage = event.stage
            self._steps[event.stage] = _Step(event, now)
            self._start_ticker()
        elif isinstance(event, CacheHit):
            if stage in self._steps:
                self._steps[stage].cached = True
        elif isinstance(event, Output):
            if stage in self._steps:
                self._steps[stage].add(event.data)
        elif isinstance(event, StepDone):
            done.append(self._finish_step(event, stage, now))
        elif isinstance(event, Transfer):
            blob = self._blobs.get(event.digest)
            if blob is None:
                blob = self._blobs[event.digest] = _Blob(event.action, event.done, event.total, now)
            blob.done, blob.total = event.done, event.total
            if event.state:
                del self._blobs[event.digest]
                self._moved += event.done
                took = max(now - blob.started, 1e-3)
                verb = "pulled" if event.action == "pull" else "pushed"
                rate = f" ({_size(event.done / took)}/s)" if event.state == "done" else ""
                done.append(
                    self._paint(_BLUE, f"  {verb} {event.digest[:19]} {_size(event.done)} {event.state}")
                    + f" in {_secs(took)}{rate}"
                )
        elif isinstance(event, Warn):
            done.append(self._paint(_YELLOW, event.text))
        elif isinstance(event, Notice):
            done.append(event.text)
        elif isinstance(event, BuildDone):
            for step in self._steps.values():  # FROM and other steps that make no StepDone
                done.append(self._step_line(step, now - step.started))
            self._steps.clear()
            self._stop.set()
            done.append(self._summary(event))
        self._redraw(done)

    def _finish_step(self, event: StepDone, stage: int, now: float) -> str:
        step = self._steps.pop(stage, None) or _Step(StepStarted(0, 0, 0, 0, "?", "", 0), now)
        step.cached = step.cached or event.cached
        self._counts["cached" if step.cached else "run"] += 1
        if not step.cached and event.seconds >= self._slowest[0]:
            self._slowest = (event.seconds, step.event.text)
        return self._step_line(step, event.seconds)

    def _step_line(self, step: _Step, seconds: float) -> str:
        e = step.event
        mark = self._paint(_GREEN, "CACHED") if step.cached else self._paint(_DIM, _secs(seconds))
        return f"{self._paint(_GREEN, '✔')} {self._where(e)}{e.text}  {mark}"

    @staticmethod
    def _where(e: StepStarted) -> str:
        return f"[{e.stage}/{e.stages}] {e.index}/{e.steps} " if e.stages > 1 else f"{e.index}/{e.steps} "

    def _summary(self, event: BuildDone) -> str:
        run, cached = self._counts["run"], self._counts["cached"]
        parts = [f"{run} run, {cached} cached"]
        if self._moved:
            parts.append(f"{_size(self._moved)} transferred")
        if self._slowest[1]:
            parts.append(f"slowest {_secs(self._slowest[0])} ({self._slowest[1][:40]})")
        head = self._paint(_BOLD, f"Built {event.image_id[7:19]} in {_secs(event.seconds)}")
        return f"{head}: " + "; ".join(parts)

    # -- drawing

    def _paint(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text

    def _live(self, now: float) -> list[str]:
        lines: list[str] = []
        for step in self._steps.values():
            e = step.event
            state = self._paint(_GREEN, "CACHED") if step.cached else _secs(now - step.started)
            lines.append(f"{self._paint(_BOLD, '▶')} {self._where(e)}{e.text}  {state}")
            lines += [self._paint(_DIM, f"  │ {line}") for line in step.tail()]
        lines += [blob.line(digest, now) for digest, blob in self._blobs.items()]
        return lines

    def _redraw(self, done: list[str]) -> None:
        """Finished lines go above (scrolling away as a terminal does), the live block is drawn anew below."""
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns or 120  # a pty nobody sized: 0
        except OSError:
            width = 120
        live = self._live(time.monotonic())
        out = [f"\x1b[{self._drawn}F" if self._drawn else "\r"]
        out += [f"{_fit(line, width)}\x1b[K\n" for line in done + live]
        out.append("\x1b[J")
        self._drawn = len(live)
        self.stream.write("".join(out))
        self.stream.flush()

    def _start_ticker(self) -> None:
        """Elapsed times move while a step is silent: a daemon thread redraws, started in the process that
        builds (after the fork into the user namespace, where the first step begins)."""
        if self._ticker is not None and self._ticker.is_alive():
            return
        self._stop.clear()

        def tick() -> None:
            while not self._stop.wait(TICK):
                with self._lock:
                    if self._steps or self._blobs:
                        try:
                            self._redraw([])
                        except (OSError, ValueError):
                            return

        self._ticker = threading.Thread(target=tick, name="rbuild-tty", daemon=True)
        self._ticker.start()


def _fit(line: str, width: int) -> str:
    """Cut a line to the terminal width (a wrapped line would break the count of lines to redraw); escape
    sequences take no columns."""
    visible = 0
    out = []
    i = 0
    while i < len(line):
        if line[i] == "\x1b":
            end = line.find("m", i)
            out.append(line[i : end + 1])
            i = end + 1
            continue
        if visible >= width - 1:
            break
        out.append(line[i])
        visible += 1
        i += 1
    return "".join(out) + (_RESET if "\x1b" in line else "")
