"""Per-blob transfer progress as Transfer events for a reporter (the command line draws them)."""

from __future__ import annotations

import threading
import time

from rootless.events import NullReporter, Reporter, Transfer


class Progress:
    """Thread-safe progress for a set of blobs: start, bytes as they move (at most every INTERVAL seconds
    per blob, so a JSON consumer is not flooded), and the settled state of each."""

    INTERVAL = 0.2

    def __init__(self, reporter: Reporter | None, action: str = "pull") -> None:
        self.reporter: Reporter = reporter or NullReporter()
        self.action = action
        self._lock = threading.Lock()
        self._rows: dict[str, list[int]] = {}  # digest -> [done bytes, total]
        self._sent: dict[str, float] = {}  # digest -> when its last event went out

    def _emit(self, digest: str, state: str = "", force: bool = True) -> None:
        """Called with the lock held: one Transfer event for digest, unless one went out just now."""
        now = time.monotonic()
        if not force and now - self._sent.get(digest, 0.0) < self.INTERVAL:
            return
        self._sent[digest] = now
        done, total = self._rows[digest]
        self.reporter.emit(Transfer(self.action, digest, done, total, state))

    def start(self, digest: str, total: int) -> None:
        """A blob transfer begins (or restarts from zero)."""
        with self._lock:
            self._rows[digest] = [0, total]
            self._emit(digest)

    def advance(self, digest: str, n: int) -> None:
        """`n` more bytes of `digest` arrived."""
        with self._lock:
            self._rows[digest][0] += n
            self._emit(digest, force=False)

    def reset(self, digest: str, done: int) -> None:
        """A transfer resumed at `done` bytes (or restarted at 0)."""
        with self._lock:
            self._rows[digest][0] = done
            self._emit(digest)

    def finish(self, digest: str, state: str) -> None:
        """`digest` is settled: "done", "skipped: already exists", "mounted", ..."""
        with self._lock:
            self._rows.setdefault(digest, [0, 0])
            self._emit(digest, state)
