"""Atomic file replacement: the one way a file is written that others may read at any moment (store
metadata, blobs, layouts, archives, the auth file). Readers see the old file or the whole new one, never a
part, and a failure leaves no temporary file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(
    path: str, mode: int = 0o644, prefix: str = ".tmp-", durable: bool = False, tmp_dir: str | None = None
) -> Iterator[BinaryIO]:
    """A temporary file next to `path`, open for writing: renamed over `path` (with `mode`) when the block
    ends, removed when it raises. `durable` syncs the data before the rename, for files whose loss after a
    power cut would lose more than they hold. `prefix` and `tmp_dir` (same file system; default: `path`'s
    directory) place the temporary file where whoever sweeps such files looks."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or os.path.dirname(path) or ".", prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str, data: bytes, mode: int = 0o644, durable: bool = False, prefix: str = ".tmp-") -> None:
    """Replace `path` by `data` atomically (see atomic_file)."""
    with atomic_file(path, mode, prefix, durable) as f:
        f.write(data)
