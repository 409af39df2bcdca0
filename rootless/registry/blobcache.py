"""Where blobs were last seen (digest -> registry, repository), so a push can mount instead of upload.

A base image pulled in one rbuild run is usually pushed, under another name, in a later run: the
memory must outlive the process. It is a hint only: a stale row costs one refused mount request.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path


def default_path() -> Path:
    """`$XDG_CACHE_HOME/rbuild/blob-locations.sqlite` (or under `~/.cache`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rbuild" / "blob-locations.sqlite"


class BlobLocations:
    """A small sqlite table shared by concurrent rbuild processes (sqlite does the locking)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                db = sqlite3.connect(self.path, timeout=5, check_same_thread=False)
                db.execute(
                    "CREATE TABLE IF NOT EXISTS seen (digest TEXT, registry TEXT, repository TEXT,"
                    " at REAL, PRIMARY KEY (digest, registry, repository))"
                )
                self._db = db
            except (OSError, sqlite3.Error):
                return None  # an unwritable cache only costs mounts, never a pull or a push
        return self._db

    def record(self, registry: str, repository: str, digests: list[str]) -> None:
        """Note that `registry/repository` holds `digests`."""
        with self._lock:
            db = self._conn()
            if db is None:
                return
            try:
                with db:
                    db.executemany(
                        "INSERT OR REPLACE INTO seen VALUES (?, ?, ?, ?)",
                        [(d, registry, repository, time.time()) for d in digests],
                    )
            except sqlite3.Error:
                pass

    def forget(self, registry: str, repository: str, digest: str) -> None:
        """Drop a location the registry denied having."""
        with self._lock:
            db = self._conn()
            if db is None:
                return
            try:
                with db:
                    db.execute(
                        "DELETE FROM seen WHERE digest = ? AND registry = ? AND repository = ?",
                        (digest, registry, repository),
                    )
            except sqlite3.Error:
                pass

    def candidates(self, digest: str, registry: str, exclude: str, limit: int = 3) -> list[str]:
        """Other repositories of `registry` known to hold `digest`, most recently seen first."""
        with self._lock:
            db = self._conn()
            if db is None:
                return []
            try:
                rows = db.execute(
                    "SELECT repository FROM seen WHERE digest = ? AND registry = ? AND"
                    " repository != ? ORDER BY at DESC LIMIT ?",
                    (digest, registry, exclude, limit),
                ).fetchall()
            except sqlite3.Error:
                return []
        return [r[0] for r in rows]
