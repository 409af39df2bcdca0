"""A blob file one thread writes while others read it as it grows: a push uploads a layer while it is being
compressed, a pull unpacks a layer while it is being downloaded.

Readers use pread on a descriptor of their own (dup'ed from the writer's), so they never move the writer's
offset and keep reading after the writer renames the file into place or removes it. A reader's end of
stream comes only when the writer says the file is complete (for a download: verified), and a writer's
failure is raised to every reader, so a consumer never takes a half-written blob for a whole one.
"""

from __future__ import annotations

import io
import os
import threading
from typing import BinaryIO

from rootless.errors import RbuildError

POLL = 0.1  # how often a waiting reader looks at its cancel event


class Restarted(RbuildError):
    """The writer started the file over (a download restarted) after this reader had read from it."""


class Cancelled(RbuildError):
    """The readers gave up: the writer stops at its next write."""


class Growing:
    """The shared state of one growing file: how many bytes are written, whether it is complete or failed."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._cond = threading.Condition()
        self._fd = -1
        self._size = 0
        self._generation = 0  # bumped when the writer starts the file over
        self._finished = False
        self._error: BaseException | None = None
        self._cancelled = False
        self.digest = ""

    # -- the writer's side

    def attach(self, fd: int) -> None:
        """The file is open for writing (and reading: readers pread a duplicate of it) on `fd`."""
        with self._cond:
            if self._fd < 0:
                self._fd = os.dup(fd)

    def grew(self, size: int) -> None:
        """`size` bytes are now written (and flushed to the file); a cancelled file stops its writer here."""
        with self._cond:
            if self._cancelled:
                raise Cancelled(f"{self.what}: cancelled")
            self._size = size
            self._cond.notify_all()

    def restart(self) -> None:
        """The writer truncated the file to start over."""
        with self._cond:
            self._size = 0
            self._generation += 1
            self._cond.notify_all()

    def finish(self, digest: str, size: int, path: str | None = None) -> None:
        """The file is complete: `size` bytes of blob `digest` (at `path`, when nothing was attached)."""
        with self._cond:
            if self._fd < 0 and path is not None:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.digest, self._size, self._finished = digest, size, True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The writer gave up: readers raise `error` (a finished file stays finished)."""
        with self._cond:
            if not self._finished and self._error is None:
                self._error = error
            self._cond.notify_all()

    # -- the readers' side

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._finished

    def cancel(self) -> None:
        """No one wants the file any more: the writer's next `grew` raises Cancelled."""
        with self._cond:
            self._cancelled = True

    def wait(self, size: int, cancel: threading.Event | None = None, generation: int | None = None) -> int:
        """Block until at least `size` bytes are written or the file is complete; returns the bytes written.
        Raises the writer's error, Cancelled when `cancel` is set, Restarted when the file was started over
        since `generation`."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if generation is not None and generation != self._generation:
                    raise Restarted(f"{self.what}: the transfer started over")
                if self._finished or (self._size >= size and self._fd >= 0):
                    return self._size
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"{self.what}: cancelled")
                self._cond.wait(POLL)

    def result(self, cancel: threading.Event | None = None) -> tuple[str, int]:
        """(digest, size) once the file is complete."""
        self.wait(1 << 62, cancel)
        return self.digest, self._size

    def pread(self, n: int, offset: int, generation: int | None, cancel: threading.Event | None) -> tuple[bytes, int]:
        """Up to `n` bytes at `offset` once they are written (b"" at the end of a complete file), with the
        generation they belong to; Restarted if the file was started over since `generation`."""
        while True:
            self.wait(offset + 1, cancel, generation)
            with self._cond:
                gen, avail, fd = self._generation, self._size, self._fd
            if generation is not None and gen != generation:
                raise Restarted(f"{self.what}: the transfer started over")
            if offset >= avail:
                return b"", gen  # only a complete file gets here
            data = os.pread(fd, min(n, avail - offset), offset)
            with self._cond:
                if self._generation != gen:  # truncated while we read: these bytes may be from either
                    if generation is not None:
                        raise Restarted(f"{self.what}: the transfer started over")
                    continue
            return data, gen

    def reader(self, cancel: threading.Event | None = None) -> GrowingReader:
        """A reader from the file's first byte (seekable: every read is a pread)."""
        return GrowingReader(self, cancel)

    def close(self) -> None:
        """Release the readers' descriptor (the readers are done)."""
        with self._cond:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._cancelled = True


class GrowingReader(io.RawIOBase, BinaryIO):
    """Reads a Growing file from its start, blocking for bytes not yet written; its end of stream means the
    writer finished the file."""

    def __init__(self, growing: Growing, cancel: threading.Event | None) -> None:
        self.growing = growing
        self.cancel = cancel
        self.pos = 0
        self.generation: int | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.pos
        elif whence == io.SEEK_END:
            offset += self.growing.result(self.cancel)[1]
        self.pos = offset
        return offset

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if size == 0:
            return b""
        data, gen = self.growing.pread(size, self.pos, self.generation if self.pos else None, self.cancel)
        if self.generation is None or not self.pos:
            self.generation = gen
        self.pos += len(data)
        return data
