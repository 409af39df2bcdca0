"""Per-blob transfer progress: live lines on a terminal, one line per finished blob elsewhere."""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Thread-safe progress for a set of blobs; a no-op when disabled."""

    INTERVAL = 0.2

    def __init__(self, enabled: bool, verb: str = "Copying", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.verb = verb
        self._lock = threading.Lock()
        self._rows: dict[str, list[Any]] = {}  # digest -> [done bytes, total, state]
        self._drawn = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.live:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def start(self, digest: str, total: int) -> None:
        """A blob transfer begins (or restarts from zero)."""
        if self.enabled:
            with self._lock:
                self._rows[digest] = [0, total, ""]

    def advance(self, digest: str, n: int) -> None:
        """`n` more bytes of `digest` arrived."""
        if self.live:
            with self._lock:
                self._rows[digest][0] += n

    def reset(self, digest: str, done: int) -> None:
        """A transfer resumed at `done` bytes (or restarted at 0)."""
        if self.live:
            with self._lock:
                self._rows[digest][0] = done

    def finish(self, digest: str, state: str) -> None:
        """`digest` is settled: "done", "skipped: already exists", "mounted", ..."""
        if not self.enabled:
            return
        with self._lock:
            row = self._rows.setdefault(digest, [0, 0, ""])
            row[2] = state
            if not self.live:
                self.stream.write(f"{self.verb} blob {digest[:19]} {state}\n")
                self.stream.flush()

    def close(self) -> None:
        """Stop redrawing and leave the final state on screen."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._draw()

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            lines = []
            for digest, (done, total, state) in self._rows.items():
                amount = state or f"{_size(done)} / {_size(total)}"
                lines.append(f"{self.verb} blob {digest[:19]} {amount}")
            out = ("\x1b[A" * self._drawn) + "".join(f"\r\x1b[K{line}\n" for line in lines)
            self._drawn = len(lines)
        self.stream.write(out)
        self.stream.flush()
