"""The verifying reader: a blob from outside (a registry, a layout, an archive, the store's own files) is
hashed and counted while it streams, and refused at its end unless it is exactly the digest and size named.

After umoci's VerifiedReadCloser: the check happens in the read that reaches the end of the stream, so a
consumer that reads to the end (a copy, an unpacker that drains) cannot miss it.
"""

from __future__ import annotations

import hashlib
import io
from typing import IO, BinaryIO

from rootless.blob.digest import parse_digest
from rootless.errors import RbuildError

CHUNK = 1 << 20


class BlobMismatch(RbuildError):
    """The bytes are not the blob the descriptor names (wrong digest, too short or too long)."""

    def __init__(self, what: str, cause: str) -> None:
        super().__init__(f"{what}: {cause}")
        self.cause = cause


class Verifier:
    """Counts and hashes bytes as they pass; `check()` says whether they were exactly `digest` (and `size`)."""

    def __init__(self, digest: str, size: int | None = None, what: str = "") -> None:
        self.algo = parse_digest(digest, ("sha256", "sha384", "sha512"))[0]
        self.digest, self.size = digest, size if size is not None and size >= 0 else None
        self.what = what or f"blob {digest}"
        self.reset()

    def reset(self) -> None:
        """Start over (a download that restarts from its first byte)."""
        self.hash = hashlib.new(self.algo)
        self.count = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes; more than `size` is refused at once (a stream that never ends is cut)."""
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise BlobMismatch(self.what, f"more than the expected {self.size} bytes")
        self.hash.update(data)

    @property
    def got(self) -> str:
        """The digest of what has passed so far."""
        return f"{self.algo}:{self.hash.hexdigest()}"

    def check(self) -> None:
        """At the end of the stream: BlobMismatch unless it was the whole blob."""
        if self.size is not None and self.count != self.size:
            raise BlobMismatch(self.what, f"{self.count} of {self.size} bytes")
        if self.got != self.digest:
            raise BlobMismatch(self.what, f"digest mismatch (content is {self.got})")


def verify_bytes(data: bytes, digest: str, size: int | None = None, what: str = "") -> bytes:
    """`data` itself if it is the blob `digest` (of `size` bytes); BlobMismatch if not."""
    v = Verifier(digest, size, what)
    v.update(data)
    v.check()
    return data


class VerifyingReader(io.RawIOBase, BinaryIO):
    """A stream read through a Verifier: the read that reaches the end raises BlobMismatch when the stream
    was not the blob. `close()` closes the stream it wraps."""

    def __init__(self, raw: IO[bytes] | io.RawIOBase, digest: str, size: int | None = None, what: str = "") -> None:
        self.raw = raw
        self.verifier = Verifier(digest, size, what)
        self.checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        if not view:
            return 0
        if isinstance(self.raw, io.RawIOBase):
            n = self.raw.readinto(view) or 0
        else:
            data = self.raw.read(len(view))
            n = len(data)
            view[:n] = data
        self._passed(view[:n])
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Straight from the wrapped stream (no copy through a buffer), verified the same way."""
        if size == 0:
            return b""
        data = self.raw.read(-1 if size is None else size)
        self._passed(data)
        return data

    def _passed(self, data: bytes | memoryview) -> None:
        if data:
            self.verifier.update(data)
        elif not self.checked:
            self.checked = True
            self.verifier.check()

    def drain(self) -> None:
        """Read what is left (and so check it)."""
        buf = bytearray(CHUNK)
        while self.readinto(buf):
            pass

    def close(self) -> None:
        self.raw.close()
        super().close()
